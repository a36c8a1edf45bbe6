fn main() {
    afl::fuzz!(|data: &[u8]| fencepost_fuzz::pg::startup(data));
}
