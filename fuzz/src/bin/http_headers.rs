fn main() {
    afl::fuzz!(|data: &[u8]| fencepost_fuzz::http_headers::run(data));
}
