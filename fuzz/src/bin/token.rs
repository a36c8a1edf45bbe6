fn main() {
    afl::fuzz!(|data: &[u8]| fencepost_fuzz::token::run(data));
}
