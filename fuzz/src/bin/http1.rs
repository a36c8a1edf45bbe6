fn main() {
    afl::fuzz!(|data: &[u8]| fencepost_fuzz::http1::run(data));
}
