//! Keeps `docs/` true: what the reference names must exist, and what the
//! binary offers must be in the reference.
//!
//! Black-box on purpose, so the checks survive refactors: config keys are
//! checked by starting the real `fencepost serve` with every documented
//! key, environment variables and commands against the binary's `--help`,
//! metrics against a running server's `/metrics` after real traffic
//! through both proxies, and problem types and SQLSTATEs against the
//! source tree as text.

use crate::support::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

// ------------------------------------------------------------ reading docs

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the package sits in the workspace")
        .to_path_buf()
}

/// A page of `docs/`, without its "Not yet" sections: what is planned but
/// not built must not be checked against the code.
fn doc(name: &str) -> String {
    let path = root().join("docs").join(name);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    without_not_yet(&text)
}

fn heading(line: &str) -> Option<(usize, &str)> {
    let level = line.bytes().take_while(|b| *b == b'#').count();
    (level > 0 && line[level..].starts_with(' ')).then(|| (level, line[level..].trim()))
}

fn without_not_yet(text: &str) -> String {
    let mut out = String::new();
    let mut skipping: Option<usize> = None;
    let mut fenced = false;
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        if !fenced {
            if let Some((level, title)) = heading(line) {
                if skipping.is_some_and(|l| level <= l) {
                    skipping = None;
                }
                if title.eq_ignore_ascii_case("not yet") {
                    skipping = Some(level);
                }
            }
        }
        if skipping.is_none() {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// One data row of a Markdown table, with the heading it sits under and
/// the table's column names (lower-cased).
#[derive(Debug, Clone)]
struct Row {
    heading: String,
    columns: Vec<String>,
    cells: Vec<String>,
}

impl Row {
    fn cell(&self, column: &str) -> Option<&str> {
        let i = self.columns.iter().position(|c| c == column)?;
        self.cells.get(i).map(String::as_str)
    }
}

/// Cells of a table line; `\|` is a pipe inside a cell.
fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    let mut out = vec![String::new()];
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                out.last_mut().expect("a cell").push('|');
                chars.next();
            }
            '|' => out.push(String::new()),
            c => out.last_mut().expect("a cell").push(c),
        }
    }
    out.into_iter().map(|c| c.trim().to_owned()).collect()
}

fn tables(text: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut current = String::new();
    let mut columns: Option<Vec<String>> = None;
    let mut last_was_table = false;
    let mut fenced = false;
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        if fenced {
            continue;
        }
        if let Some((_, title)) = heading(line) {
            current = title.to_owned();
        }
        let is_table = line.trim_start().starts_with('|');
        if !is_table {
            columns = None;
            last_was_table = false;
            continue;
        }
        if !last_was_table {
            // A header row, followed by the |---| separator.
            let separator = lines.get(i + 1).is_some_and(|l| l.contains("---"));
            assert!(separator, "table without a header separator: {line}");
            columns = Some(cells(line).iter().map(|c| c.to_lowercase()).collect());
            last_was_table = true;
            continue;
        }
        if line.contains("---")
            && cells(line)
                .iter()
                .all(|c| c.chars().all(|ch| ch == '-' || ch == ':'))
        {
            continue;
        }
        rows.push(Row {
            heading: current.clone(),
            columns: columns.clone().expect("rows follow a header"),
            cells: cells(line),
        });
    }
    rows
}

/// The `code spans` of a piece of Markdown.
fn ticks(text: &str) -> Vec<String> {
    text.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s.to_owned())
        .collect()
}

fn toml_value(literal: &str) -> Option<toml::Value> {
    format!("v = {literal}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
}

// --------------------------------------------------------------- the binary

fn help(args: &[&str]) -> String {
    let mut all: Vec<&str> = args.to_vec();
    all.push("--help");
    let (code, out, err) = run_cli(&all, &[]);
    assert_eq!(code, 0, "fencepost {all:?} failed: {err}");
    out
}

/// Long flags a help text offers.
fn help_flags(text: &str) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    for line in text.lines() {
        let t = line.trim_start();
        let t = match t.strip_prefix('-') {
            Some(rest) if !rest.starts_with('-') => match t.split_once(", ") {
                Some((_, long)) => long,
                None => continue,
            },
            _ => t,
        };
        if let Some(rest) = t.strip_prefix("--") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if !name.is_empty() {
                flags.insert(format!("--{name}"));
            }
        }
    }
    flags
}

/// `[env: NAME` markers of a help text.
fn help_envs(text: &str) -> BTreeSet<String> {
    text.split("[env: ")
        .skip(1)
        .map(|s| {
            s.chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect()
}

/// The subcommands listed under `Commands:`.
fn help_commands(text: &str) -> BTreeSet<String> {
    text.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect()
}

/// `(variable, "section.key")` of `fencepost serve --help`'s list.
fn serve_env_list() -> BTreeSet<(String, String)> {
    help(&["serve"])
        .lines()
        .skip_while(|l| !l.starts_with("Environment variables"))
        .skip(1)
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            Some((words.next()?.to_owned(), words.next()?.to_owned()))
        })
        .filter(|(v, _)| v.starts_with("FENCEPOST_"))
        .collect()
}

// ------------------------------------------------------------- config.md

/// A documented config key.
#[derive(Debug, Clone)]
struct Key {
    /// "" for the top level, else the section (`http` for `[[http]]`).
    section: String,
    key: String,
    env: String,
    /// The first code span of the default column that is a TOML value.
    example: Option<String>,
}

fn section_of(heading: &str) -> Option<String> {
    if heading.eq_ignore_ascii_case("top level") {
        return Some(String::new());
    }
    let t = ticks(heading);
    let name = t.first()?.trim_start_matches('[').trim_end_matches(']');
    (t.len() == 1 && name.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .then(|| name.to_owned())
}

fn config_keys() -> Vec<Key> {
    let mut keys = Vec::new();
    for row in tables(&doc("config.md")) {
        let Some(section) = section_of(&row.heading) else {
            continue;
        };
        let (Some(key), Some(env)) = (row.cell("key"), row.cell("environment")) else {
            continue;
        };
        let key = ticks(key).first().cloned().expect("a key in code");
        let env = ticks(env).first().cloned().expect("a variable in code");
        let example = row
            .cell("default")
            .map(ticks)
            .unwrap_or_default()
            .into_iter()
            .find(|t| toml_value(t).is_some());
        keys.push(Key {
            section,
            key,
            env,
            example,
        });
    }
    assert!(keys.len() > 20, "config.md tables not found: {keys:?}");
    keys
}

fn path_of(section: &str, key: &str) -> String {
    if section.is_empty() {
        key.to_owned()
    } else {
        format!("{section}.{key}")
    }
}

#[test]
fn every_config_key_in_the_docs_has_the_variable_serve_help_lists_and_no_more() {
    let documented: BTreeSet<(String, String)> = config_keys()
        .iter()
        .map(|k| (k.env.clone(), path_of(&k.section, &k.key)))
        .collect();
    let offered = serve_env_list();
    assert!(!offered.is_empty(), "serve --help lists no variables");
    let undocumented: Vec<_> = offered.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&offered).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "docs/config.md and `fencepost serve --help` disagree.\n\
         in --help, not in the docs: {undocumented:?}\n\
         in the docs, not in --help: {unknown:?}"
    );
}

#[test]
fn every_key_of_the_example_config_is_documented() {
    let text = std::fs::read_to_string(root().join("fencepost.example.toml"))
        .expect("read fencepost.example.toml");
    // The [[postgres]] block is commented out; it is valid once uncommented.
    let mut uncommented = String::new();
    let mut in_pg = false;
    for line in text.lines() {
        in_pg |= line.starts_with("# [[postgres]]");
        let line = if in_pg {
            line.strip_prefix("# ").unwrap_or(line)
        } else {
            line
        };
        uncommented.push_str(line);
        uncommented.push('\n');
    }
    let example: toml::Table = uncommented.parse().expect("the example parses");
    let documented: BTreeSet<String> = config_keys()
        .iter()
        .map(|k| path_of(&k.section, &k.key))
        .collect();
    let route_keys: BTreeSet<String> = tables(&doc("config.md"))
        .iter()
        .filter(|r| r.heading.eq_ignore_ascii_case("route entries"))
        .filter_map(|r| r.cell("key").and_then(|k| ticks(k).first().cloned()))
        .collect();
    let mut missing = Vec::new();
    for (name, value) in &example {
        let entries: Vec<&toml::Table> = match value {
            toml::Value::Table(t) => vec![t],
            toml::Value::Array(a) => a.iter().filter_map(toml::Value::as_table).collect(),
            _ => {
                if !documented.contains(name) {
                    missing.push(name.clone());
                }
                continue;
            }
        };
        for entry in entries {
            for (key, v) in entry {
                if !documented.contains(&format!("{name}.{key}")) {
                    missing.push(format!("{name}.{key}"));
                }
                if key == "routes" {
                    for route in v
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|r| r.as_table())
                    {
                        missing.extend(
                            route
                                .keys()
                                .filter(|k| !route_keys.contains(*k))
                                .map(|k| format!("{name}.routes[].{k}")),
                        );
                    }
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "fencepost.example.toml has keys docs/config.md does not document: {missing:?}"
    );
}

#[tokio::test]
async fn serve_accepts_every_documented_config_key_with_its_documented_value() {
    let dir = TempDir::new("fp-docs-config");
    let d = dir.path();
    // Files the keys point at.
    let (code, _, err) = run_cli(
        &["keygen", "--out", &d.join("elector").display().to_string()],
        &[],
    );
    assert_eq!(code, 0, "keygen: {err}");
    // Every listener gets TLS with client certificates (the documented
    // `tls_*` keys are set on each section): the real `keygen tls` makes
    // the CA, the server's and a client's certificate.
    let pki = tls::Pki::keygen(&d.join("pki"), &["docs"]);

    let (admin, elector) = (free_addr(), free_addr());
    let quoted = |s: String| toml::Value::String(s).to_string();
    let file = |name: &str| quoted(d.join(name).display().to_string());
    let mut sections: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for k in config_keys() {
        let value = match (k.section.as_str(), k.key.as_str()) {
            ("admin", "listen") => quoted(admin.to_string()),
            ("elector", "listen") => quoted(elector.to_string()),
            (_, "listen") => quoted(free_addr().to_string()),
            ("elector", "signing_key") => file("elector.key"),
            (_, "verify_key") => file("elector.pub"),
            (_, "tls_cert") => file("pki/server.pem"),
            (_, "tls_key") => file("pki/server.key"),
            (_, "tls_client_ca") => file("pki/ca.pem"),
            // The watch reaches the elector over TLS now; a plain URL is
            // a documented value all the same (the watch only retries).
            ("http", "elector_watch") => quoted(format!("http://{elector}")),
            // A CA file is read only for a TLS upstream: the keys that
            // read it are set to ones that do.
            ("http", "upstream") => quoted("https://127.0.0.1:9000".to_owned()),
            ("postgres", "upstream_sslmode") => quoted("verify-full".to_owned()),
            (_, "upstream_ca") => file("pki/ca.pem"),
            _ => k.example.clone().unwrap_or_else(|| {
                panic!(
                    "docs/config.md gives {} no TOML value (a default or an e.g. in code)",
                    path_of(&k.section, &k.key)
                )
            }),
        };
        sections
            .entry(k.section.clone())
            .or_default()
            .push(format!("{} = {value}", k.key));
    }
    let mut text = sections.remove("").unwrap_or_default().join("\n");
    for (section, lines) in &sections {
        let header = if section == "http" || section == "postgres" {
            format!("[[{section}]]")
        } else {
            format!("[{section}]")
        };
        text.push_str(&format!("\n\n{header}\n{}", lines.join("\n")));
    }

    let mut server = Server::start(d, &text);
    wait_port(admin).await;
    let (cert, key) = pki.client("docs");
    let cfg = tls::client_config(&pki.ca, Some((&cert, &key)));
    let answer = tls::get(admin, "/healthz", &cfg).await;
    assert!(
        matches!(answer, Ok((200, _))),
        "{answer:?}\nconfig:\n{text}\nlog:\n{}",
        server.log_text()
    );
    let exit = server.terminate().expect("serve was running");
    assert!(
        exit.success(),
        "serve with every documented key exited {exit:?}\nconfig:\n{text}\nlog:\n{}",
        server.log_text()
    );

    // The check means something: a key the docs do not have is refused.
    let bad = d.join("bad.toml");
    std::fs::write(&bad, format!("not_a_documented_key = 1\n{text}")).expect("write bad config");
    let (code, _, err) = run_cli(&["serve", "--config", &bad.display().to_string()], &[]);
    assert_ne!(code, 0, "an unknown key was accepted");
    assert!(err.contains("not_a_documented_key"), "{err}");
}

// ------------------------------------------------------------------ cli.md

/// `fencepost <words>` headings of cli.md and the long flags of the table
/// under each.
fn cli_sections() -> BTreeMap<String, BTreeSet<String>> {
    let text = doc("cli.md");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some((_, title)) = heading(line) {
            if let Some(cmd) = ticks(title)
                .first()
                .and_then(|t| t.strip_prefix("fencepost "))
            {
                out.entry(cmd.to_owned()).or_default();
            }
        }
    }
    for row in tables(&text) {
        let Some(cmd) = ticks(&row.heading)
            .first()
            .and_then(|t| t.strip_prefix("fencepost "))
            .map(str::to_owned)
        else {
            continue;
        };
        let Some(flag) = row.cell("flag") else {
            continue;
        };
        for t in ticks(flag) {
            if let Some(long) = t.split_whitespace().next().filter(|f| f.starts_with("--")) {
                out.entry(cmd.clone()).or_default().insert(long.to_owned());
            }
        }
    }
    out
}

#[test]
fn every_command_and_flag_in_cli_md_exists_and_every_one_in_help_is_documented() {
    let documented = cli_sections();
    // Commands: the top level, and the lease subcommands.
    let top: BTreeSet<String> = documented
        .keys()
        .filter(|c| !c.contains(' '))
        .cloned()
        .collect();
    assert_eq!(
        top,
        help_commands(&help(&[])),
        "commands: docs/cli.md vs --help"
    );
    let lease: BTreeSet<String> = documented
        .keys()
        .filter_map(|c| c.strip_prefix("lease "))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        lease,
        help_commands(&help(&["lease"])),
        "lease subcommands: docs/cli.md vs --help"
    );
    let audit: BTreeSet<String> = documented
        .keys()
        .filter_map(|c| c.strip_prefix("audit "))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        audit,
        help_commands(&help(&["audit"])),
        "audit subcommands: docs/cli.md vs --help"
    );
    // Flags of every command, but of a group (`lease`) whose flags are
    // its subcommands'.
    let global: BTreeSet<String> = ["--help", "--version", "--log-format"]
        .map(String::from)
        .into();
    for (cmd, flags) in &documented {
        let args: Vec<&str> = cmd.split(' ').collect();
        let text = help(&args);
        let offered: BTreeSet<String> = help_flags(&text).difference(&global).cloned().collect();
        if !help_commands(&text).is_empty() && offered.is_empty() {
            continue;
        }
        assert_eq!(
            flags, &offered,
            "flags of `fencepost {cmd}`: docs/cli.md vs --help"
        );
    }
    // The global option is documented once, in its own table.
    let global_rows: BTreeSet<String> = tables(&doc("cli.md"))
        .iter()
        .filter(|r| r.heading.eq_ignore_ascii_case("global options"))
        .filter_map(|r| r.cell("flag").and_then(|f| ticks(f).first().cloned()))
        .filter_map(|f| f.split_whitespace().next().map(str::to_owned))
        .collect();
    let top_flags = help_flags(&help(&[]));
    assert!(top_flags.contains("--log-format"));
    assert_eq!(global_rows, ["--log-format".to_owned()].into());
}

/// Concrete `FENCEPOST_*` names in a text. Templates such as
/// `FENCEPOST_<KEY>`, `FENCEPOST_HTTP_[N_]<KEY>` or
/// `FENCEPOST_HTTP_1_LISTEN` (an example index) are skipped: they end in
/// `_` or go on with `<` or a digit.
fn env_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("FENCEPOST_") {
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || *c == '_' || *c == '[' || *c == ']')
            .collect();
        let next = text[i + name.len()..].chars().next();
        if !name.ends_with('_') && !next.is_some_and(|c| c == '<' || c.is_ascii_digit()) {
            out.insert(name);
        }
    }
    out
}

#[test]
fn every_environment_variable_in_the_docs_exists_and_every_one_the_binary_reads_is_documented() {
    let mut offered: BTreeSet<String> = serve_env_list().into_iter().map(|(v, _)| v).collect();
    let mut commands: Vec<Vec<&str>> = vec![vec![]];
    for cmd in ["demo", "serve", "audit", "migrate", "keygen"] {
        commands.push(vec![cmd]);
    }
    for sub in ["acquire", "renew", "release", "show", "run"] {
        commands.push(vec!["lease", sub]);
    }
    commands.push(vec!["audit", "verify"]);
    for args in &commands {
        offered.extend(help_envs(&help(args)));
    }
    let mut documented = BTreeSet::new();
    let dir = root().join("docs");
    for entry in std::fs::read_dir(&dir).expect("read docs/") {
        let path = entry.expect("docs entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .expect("utf-8 name");
            documented.extend(env_names(&doc(name)));
        }
    }
    let unknown: Vec<_> = documented.difference(&offered).collect();
    let undocumented: Vec<_> = offered.difference(&documented).collect();
    assert!(
        unknown.is_empty() && undocumented.is_empty(),
        "FENCEPOST_* variables: in docs/ but read by nothing: {unknown:?}; \
         read by the binary but not in docs/: {undocumented:?}"
    );
}

// -------------------------------------------- problem types and SQLSTATEs

/// Non-test source text of the workspace: every `.rs` file outside test
/// directories (cut at its `#[cfg(test)]`), and every `.sql` file.
fn source_text() -> String {
    fn walk(dir: &Path, out: &mut String) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if !matches!(
                    name.as_str(),
                    "target" | "tests" | "benches" | "fuzz" | "docs" | ".git" | "node_modules"
                ) && !name.starts_with('.')
                {
                    walk(&path, out);
                }
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            if name.ends_with(".rs") && name != "tests.rs" {
                let code = text.split("#[cfg(test)]").next().unwrap_or("");
                out.push_str(code);
            } else if name.ends_with(".sql") {
                out.push_str(&text);
            }
            out.push('\n');
        }
    }
    let mut out = String::new();
    walk(&root(), &mut out);
    assert!(
        out.contains("fn main"),
        "no source found under {}",
        root().display()
    );
    out
}

/// `urn:fencepost:<name>` types named in a text (`urn:fencepost:*`, the
/// family as a whole, is not a type).
fn problem_types(text: &str) -> BTreeSet<String> {
    text.match_indices("urn:fencepost:")
        .map(|(i, _)| {
            text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == ':' || *c == '-')
                .collect::<String>()
                .trim_end_matches([':', '-'])
                .to_owned()
        })
        .filter(|t| t.len() > "urn:fencepost:".len())
        .collect()
}

#[test]
fn every_problem_type_in_the_docs_is_in_the_source_and_every_one_in_the_source_is_documented() {
    let source = problem_types(&source_text());
    let mut documented = BTreeSet::new();
    for entry in std::fs::read_dir(root().join("docs")).expect("read docs/") {
        let path = entry.expect("docs entry").path();
        if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            if name.ends_with(".md") {
                documented.extend(problem_types(&doc(name)));
            }
        }
    }
    let unknown: Vec<_> = documented.difference(&source).collect();
    let undocumented: Vec<_> = source.difference(&documented).collect();
    assert!(
        unknown.is_empty() && undocumented.is_empty(),
        "problem types: in docs/ but not in the source: {unknown:?}; \
         in the source but not in docs/: {undocumented:?}"
    );
}

fn is_sqlstate(s: &str) -> bool {
    s.len() == 5
        && s.bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
        && s.bytes().any(|b| b.is_ascii_digit())
}

/// Double-quoted string literals in Rust (or SQL) text, skipping char
/// literals such as `'"'` that would otherwise open a string.
fn string_literals(text: &str) -> Vec<&str> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\'' => {
                // '"', '\'', 'x': a char literal; anything else a lifetime
                // or an SQL quote, which never holds a double quote we need.
                if b.get(i + 1) == Some(&b'\\') && b.get(i + 3) == Some(&b'\'') {
                    i += 4;
                } else if b.get(i + 2) == Some(&b'\'') {
                    i += 3;
                } else {
                    i += 1;
                }
            }
            b'"' => {
                let start = i + 1;
                let mut j = start;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                let end = j.min(b.len());
                out.push(&text[start..end]);
                i = end + 1;
            }
            _ => i += 1,
        }
    }
    out
}

/// The argument list of the call whose `(` is at the start of `text`.
fn call_args(text: &str) -> &str {
    let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
    for (i, c) in text.char_indices() {
        match c {
            '\\' if in_str && !escaped => {
                escaped = true;
                continue;
            }
            '"' if !escaped => in_str = !in_str,
            '(' if !in_str => depth += 1,
            ')' if !in_str => {
                depth -= 1;
                if depth == 0 {
                    return &text[..=i];
                }
            }
            _ => {}
        }
        escaped = false;
    }
    text
}

/// SQLSTATEs the source sends: literal codes passed to the functions
/// that build ErrorResponses, every fencing code (`ZF...`) wherever it is
/// named, and codes the guard's SQL raises, except one its own handler
/// catches (`WHEN SQLSTATE '...'`): 0004's fast path leaves its block
/// by an exception it catches at once, which no client ever sees.
fn emitted_sqlstates(source: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for callee in ["fatal(", "error_response(", "error_response_with("] {
        for (i, _) in source.match_indices(callee) {
            let args = call_args(&source[i + callee.len() - 1..]);
            if let Some(code) = string_literals(args).into_iter().find(|s| is_sqlstate(s)) {
                out.insert(code.to_owned());
            }
        }
    }
    for lit in string_literals(source) {
        if is_sqlstate(lit) && lit.starts_with("ZF") {
            out.insert(lit.to_owned());
        }
    }
    let caught: BTreeSet<&str> = source
        .match_indices("WHEN SQLSTATE '")
        .map(|(i, _)| &source[i + "WHEN SQLSTATE '".len()..][..5])
        .collect();
    for (i, _) in source.match_indices("ERRCODE = '") {
        let code = &source[i + "ERRCODE = '".len()..][..5];
        if is_sqlstate(code) && !caught.contains(code) {
            out.insert(code.to_owned());
        }
    }
    out
}

#[test]
fn the_sqlstates_in_the_docs_are_the_ones_the_source_sends() {
    let documented: BTreeSet<String> = tables(&doc("postgres-proxy.md"))
        .iter()
        .filter(|r| r.heading.starts_with("SQLSTATEs fencepost sends"))
        .filter_map(|r| r.cell("sqlstate").and_then(|c| ticks(c).first().cloned()))
        .collect();
    assert!(
        documented.len() >= 4,
        "SQLSTATE table not found: {documented:?}"
    );
    let source = source_text();
    let emitted = emitted_sqlstates(&source);
    let unknown: Vec<_> = documented.difference(&emitted).collect();
    let undocumented: Vec<_> = emitted.difference(&documented).collect();
    assert!(
        unknown.is_empty() && undocumented.is_empty(),
        "SQLSTATEs: documented but not in the source: {unknown:?}; \
         sent by the source but not documented: {undocumented:?}"
    );
}

// -------------------------------------------------------------- metrics.md

struct Metric {
    name: String,
    labels: Vec<String>,
    at_start: bool,
}

fn documented_metrics() -> Vec<Metric> {
    let metrics: Vec<Metric> = tables(&doc("metrics.md"))
        .iter()
        .filter_map(|r| {
            let name = ticks(r.cell("metric")?).first()?.clone();
            name.starts_with("fencepost_").then(|| Metric {
                name,
                labels: r.cell("labels").map(ticks).unwrap_or_default(),
                at_start: r
                    .cell("appears")
                    .is_some_and(|a| a.trim_start().starts_with("at start")),
            })
        })
        .collect();
    assert!(metrics.len() >= 10, "metrics table not found");
    metrics
}

/// Samples of `name` (a histogram's `_bucket`, `_sum`, `_count` included):
/// their label sets.
fn samples<'a>(exposition: &'a str, name: &str) -> Vec<&'a str> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let series = l.split([' ', '{']).next().unwrap_or("");
            series == name
                || ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| series.strip_suffix(s) == Some(name))
        })
        .collect()
}

fn families(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("fencepost_"))
        .map(str::to_owned)
        .collect()
}

async fn scrape(admin: std::net::SocketAddr) -> String {
    let (status, body) = get(&format!("http://{admin}/metrics"), None).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn elector_call(
    elector: std::net::SocketAddr,
    path: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(format!("http://{elector}/v1/leases/{path}"))
        .json(&body)
        .send()
        .await
        .expect("elector answers");
    let status = resp.status().as_u16();
    let json = resp.json().await.unwrap_or(serde_json::Value::Null);
    (status, json)
}

async fn pg_through(
    proxy: std::net::SocketAddr,
    db: &TestDb,
    token: u64,
) -> tokio_postgres::Client {
    let direct: tokio_postgres::Config = db.url.parse().expect("DATABASE_URL parses");
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(proxy.port())
        .dbname(db.name.as_str())
        .user(direct.get_user().unwrap_or("postgres"))
        .options(opts(token, "orders"));
    if let Some(p) = direct.get_password() {
        cfg.password(p);
    }
    let (client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect through the proxy");
    tokio::spawn(conn);
    client
}

#[tokio::test]
async fn every_documented_metric_appears_and_every_exported_one_is_documented() {
    let documented = documented_metrics();
    let dir = TempDir::new("fp-docs-metrics");
    let db = TestDb::create("fp_docs_metrics").await;
    let up = Upstream::start().await;
    // A Postgres store, so the process is a replica of a fencing tier and
    // the tier's metrics are exported too.
    let mut conf = Conf::store(db.url.clone());
    let admin = conf.admin(Section::new());
    let elector = conf.elector(Section::new());
    let http = conf.http(Section::to(format!("http://{}", up.addr)));
    let pg = conf.postgres(Section::to(db.url.clone()));
    // A TLS listener too, for the TLS metrics.
    let pki = tls::Pki::keygen(&dir.path().join("pki"), &[]);
    let https = conf.http(pki.section(Section::to(format!("http://{}", up.addr)), false));
    // A process: /metrics is per process.
    let server = Server::run(dir.path(), conf).await;

    // Before any traffic: what the docs say is there from the start.
    let fresh = scrape(admin).await;
    for m in documented.iter().filter(|m| m.at_start) {
        assert!(
            !samples(&fresh, &m.name).is_empty(),
            "{} is documented to appear at start, but /metrics has none:\n{fresh}",
            m.name
        );
    }

    // A plaintext request on the TLS listener: a handshake failure.
    let (_, out) = tls::curl(&[&format!("http://{https}/")]).await;
    assert!(out.ends_with("400"), "{out}");
    // One admitted and one refused write through each proxy.
    let url = format!("http://{http}/orders/1");
    assert_eq!(put(&url, Some("1"), Some("orders"), "a").await.0, 200);
    assert_eq!(put(&url, Some("0"), Some("orders"), "b").await.0, 409);
    let c = pg_through(pg, &db, 1).await;
    c.batch_execute("CREATE TABLE t (v int)")
        .await
        .expect("admitted");
    drop(c);
    let stale = pg_through(pg, &db, 0).await;
    let e = stale
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .expect_err("stale");
    assert_eq!(code(&e), "ZF001");

    // Every lease event: a grant, a renewal, an expiry, a release.
    let (s, _) = elector_call(
        elector,
        "orders/acquire",
        serde_json::json!({"holder": "a", "ttl_ms": 300}),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = elector_call(
        elector,
        "orders/renew",
        serde_json::json!({"holder": "a", "token": "1", "ttl_ms": 300}),
    )
    .await;
    assert_eq!(s, 200);
    let exported = eventually(15, || async {
        let text = scrape(admin).await;
        text.contains("fencepost_elector_expiries_total")
            .then_some(text)
    })
    .await
    .expect("the lease expired and was counted");
    drop(exported);
    let (s, body) = elector_call(
        elector,
        "orders/acquire",
        serde_json::json!({"holder": "b"}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let token = body["token"].as_str().expect("a token").to_owned();
    let (s, _) = elector_call(
        elector,
        "orders/release",
        serde_json::json!({"holder": "b", "token": token}),
    )
    .await;
    assert_eq!(s, 204);

    let text = eventually(10, || async {
        let text = scrape(admin).await;
        documented
            .iter()
            .all(|m| !samples(&text, &m.name).is_empty())
            .then_some(text)
    })
    .await;
    let text = match text {
        Some(t) => t,
        None => {
            let last = scrape(admin).await;
            let missing: Vec<&str> = documented
                .iter()
                .filter(|m| samples(&last, &m.name).is_empty())
                .map(|m| m.name.as_str())
                .collect();
            panic!("documented metrics missing from /metrics: {missing:?}\n{last}");
        }
    };
    for m in &documented {
        for label in &m.labels {
            assert!(
                samples(&text, &m.name)
                    .iter()
                    .any(|s| s.contains(&format!("{label}=\""))),
                "{} is documented with label {label}, but no sample has it",
                m.name
            );
        }
    }
    let names: BTreeSet<String> = documented.iter().map(|m| m.name.clone()).collect();
    let undocumented: Vec<_> = families(&text).difference(&names).cloned().collect();
    assert!(
        undocumented.is_empty(),
        "/metrics exports metrics docs/metrics.md does not document: {undocumented:?}"
    );
    drop(server);
}
