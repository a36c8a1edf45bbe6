fn main() {
    afl::fuzz!(|data: &[u8]| fencepost_fuzz::http1_body::run(data));
}
