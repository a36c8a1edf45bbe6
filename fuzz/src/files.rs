//! The committed inputs of one target: what CI replays through the same
//! checks the fuzzer runs.

/// Every file under `fuzz/<dir>/<target>` (`dir` is `corpus` or
/// `regressions`), sorted by path; none when the directory is absent.
pub fn inputs(fuzz_dir: &str, dir: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    let path = format!("{fuzz_dir}/{dir}/{target}");
    let Ok(entries) = std::fs::read_dir(&path) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Vec<u8>)> = entries
        .map(|e| {
            let p = e.expect("read a corpus directory entry").path();
            let data = std::fs::read(&p).expect("read a corpus file");
            (p.display().to_string(), data)
        })
        .collect();
    out.sort();
    out
}
