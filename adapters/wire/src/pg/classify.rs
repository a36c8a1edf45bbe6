//! Which statements are writes, and what they say about the fencing token,
//! decided with the real Postgres grammar (`pg_query`, libpg_query).
//!
//! # Failing closed
//! A statement is a read only when it is *provably* read-only: its
//! top-level kind is on a short allow-list (SELECT, SHOW, EXPLAIN without
//! ANALYZE, transaction control, SET/RESET, cursors over reads, LISTEN, ...)
//! and nothing anywhere in its tree writes: no INSERT/UPDATE/DELETE/MERGE
//! (writable CTEs), no `SELECT ... INTO`, no `FOR UPDATE/SHARE`, no call to a
//! function on the configured list (`nextval`, `setval`, ...). Everything
//! else, including text that does not parse or is not UTF-8, is a write, so
//! a classification bug can only cost a refusal, never an unfenced write.
//!
//! The tree walk goes over pg_query's serialized parse tree generically, so
//! no node kind can be forgotten by a hand-written visitor.
//!
//! Results are cached by statement text: a leader repeating its statements
//! pays for one parse each. Texts that differ only in their numeric
//! literals (the simple protocol with inlined values: `WHERE aid = 42`,
//! `WHERE aid = 43`, ...) share one entry keyed by their *shape*, see
//! [`shape`], so they too pay for one parse, and the cache does not churn.

use std::sync::Arc;

use pg_query::protobuf::{
    a_const, DiscardMode, TransactionStmtKind, VariableSetKind, VariableSetStmt,
};
use pg_query::NodeEnum;
use serde_json::Value;

/// Functions that write even when called from a SELECT, unless configured
/// otherwise.
pub const DEFAULT_WRITE_FUNCTIONS: &[&str] = &[
    "nextval",
    "setval",
    "lo_create",
    "lo_creat",
    "lo_import",
    "lo_unlink",
    "lo_put",
    "lo_from_bytea",
    "lowrite",
    "lo_truncate",
    "lo_truncate64",
    "pg_notify",
    "dblink_exec",
];

/// Statements longer than this are classified but not cached: they are
/// usually batches with literals that never repeat.
pub(crate) const MAX_CACHED_TEXT: usize = 16 * 1024;

/// One of the two session variables the proxy tracks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceVar {
    Token,
    Resource,
}

impl FenceVar {
    /// The variable a setting's name (any case) is, if it is one of ours.
    pub fn from_name(name: &str) -> Option<FenceVar> {
        match name.to_ascii_lowercase().as_str() {
            "fencing.token" => Some(FenceVar::Token),
            "fencing.resource" => Some(FenceVar::Resource),
            _ => None,
        }
    }
}

/// A change a statement makes to the fencing variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceSetting {
    /// `SET [LOCAL] fencing.x = 'v'`; `value: None` is `SET ... TO DEFAULT`.
    Set {
        var: FenceVar,
        value: Option<String>,
        local: bool,
    },
    /// `RESET fencing.x`.
    Reset(FenceVar),
    /// `RESET ALL` or `DISCARD ALL`.
    ResetAll,
}

/// Token and resource from a leading `/* fencing.token=T fencing.resource=R */`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommentFence {
    pub token: Option<String>,
    pub resource: Option<String>,
}

/// What the proxy needs to know about one statement text (a simple Query
/// may hold several statements; they are judged together).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Classification {
    /// Not provably read-only.
    pub write: bool,
    /// Some statement ends a transaction keeping its writes (COMMIT, END,
    /// PREPARE TRANSACTION).
    pub commits: bool,
    /// The text is exactly one COMMIT/END, which the proxy may answer by
    /// rolling back instead.
    pub single_commit: bool,
    /// Changes to `fencing.token` / `fencing.resource`, in order.
    pub settings: Vec<FenceSetting>,
    pub comment: CommentFence,
    /// Some statement is neither transaction control nor a session
    /// setting (SET/RESET/SHOW/DISCARD): what `strict` mode counts as a
    /// write inside a read-write transaction block.
    pub data: bool,
    /// A data statement follows a read-write BEGIN in this same text, so
    /// `strict` mode counts it as a write whatever the session's state.
    pub data_in_block: bool,
    /// How the text leaves the transaction block: `Some(true)` inside a
    /// read-write block it opened, `Some(false)` outside one (it ended the
    /// block, or opened a read-only one), `None` as it found it.
    pub block_after: Option<bool>,
    /// Some statement cannot run inside a transaction block (VACUUM,
    /// CREATE/DROP DATABASE, CREATE INDEX CONCURRENTLY, ...), so nothing
    /// can run in its transaction beside it: guard mode cannot put its
    /// guard there.
    pub outside_block: bool,
    /// Where guard mode puts its guard calls in a text of several
    /// statements, when that is not simply in front of it (see
    /// [`GuardPoint`]); empty for one statement, for a text whose first
    /// statement is its only guarded part, and for a text that does not
    /// parse (Postgres's parser, the same grammar, refuses it whole before
    /// running any of it).
    pub guard_points: Vec<GuardPoint>,
    /// The text is not UTF-8 and holds a `;`: it may be several statements,
    /// and where they start cannot be told (guard mode refuses it).
    pub unsplit: bool,
    /// Some statement drops prepared statements (`DEALLOCATE`, `DISCARD
    /// ALL`): guard mode's own prepared guard statement may be gone after
    /// it, and is parsed again before its next use.
    pub drops_prepared: bool,
    /// Some statement is an SQL `PREPARE`: it may take the name of guard
    /// mode's prepared guard statement.
    pub prepares: bool,
}

/// One part of a multi-statement text that guard mode guards on its own.
///
/// A guard taken in a transaction protects that transaction only: a
/// `COMMIT`, `ROLLBACK` or `PREPARE TRANSACTION` inside the text ends it
/// (the rest runs in a new one), and a `ROLLBACK TO SAVEPOINT` may release
/// a gate taken after the savepoint. So the text is cut into *segments* at
/// those statements, and each segment that writes gets a guard of its own,
/// just before its first statement other than transaction control and
/// session settings (after a `BEGIN ISOLATION LEVEL ...`, which must come
/// before any query of its transaction, and as its transaction's first
/// lock). Statement indices, not byte offsets, so texts of one
/// [`shape`] share them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardPoint {
    /// The guard goes before this statement (0-based, as Postgres's parser
    /// counts them).
    pub stmt: u32,
    /// The segment is the text's first (before any transaction end): it
    /// runs in the transaction the text began in.
    pub first: bool,
    /// Some statement of the segment writes (otherwise it holds only
    /// reads, which `strict` mode may count as writes).
    pub write: bool,
}

impl Classification {
    /// A statement the proxy cannot see (an Execute of a portal it never
    /// saw bound, a fast-path function call): a write, and nothing else
    /// known. A constant, so that it is not built for each statement.
    pub const UNKNOWN_WRITE: Classification = Classification {
        write: true,
        commits: false,
        single_commit: false,
        settings: Vec::new(),
        comment: CommentFence {
            token: None,
            resource: None,
        },
        data: false,
        data_in_block: false,
        block_after: None,
        outside_block: false,
        guard_points: Vec::new(),
        unsplit: false,
        drops_prepared: false,
        prepares: false,
    };

    /// Depends on the statement's structure alone (no fencing settings, no
    /// comment values), so it may be cached by [`shape`]; otherwise only by
    /// the exact text.
    pub fn by_shape(&self) -> bool {
        self.settings.is_empty() && self.comment == CommentFence::default()
    }
}

/// Classifies statements, with a cache by text and one by shape.
pub struct Classifier {
    write_functions: Vec<String>,
    /// By exact text: texts with no shape, and texts whose classification
    /// carries values (fencing settings), which a shape would lose.
    cache: moka::sync::Cache<Box<str>, Arc<Classification>>,
    /// By [`shape`]: only classifications without settings or a comment,
    /// which depend on the statement's structure alone.
    shapes: moka::sync::Cache<Box<str>, Arc<Classification>>,
}

impl Classifier {
    /// `write_functions`: function names (last component, case-insensitive)
    /// that make a statement a write. `cache_bytes`: bound on cached text.
    pub fn new<S: AsRef<str>>(write_functions: &[S], cache_bytes: u64) -> Classifier {
        Classifier {
            write_functions: write_functions
                .iter()
                .map(|s| s.as_ref().to_ascii_lowercase())
                .collect(),
            cache: moka::sync::Cache::builder()
                .max_capacity(cache_bytes / 2)
                .weigher(weight)
                .build(),
            shapes: moka::sync::Cache::builder()
                .max_capacity(cache_bytes / 2)
                .weigher(weight)
                .build(),
        }
    }

    /// Classifies raw statement bytes as they came off the wire.
    pub fn classify_bytes(&self, text: &[u8]) -> Arc<Classification> {
        match std::str::from_utf8(text) {
            Ok(t) => self.classify(t),
            Err(_) => Arc::new(Classification {
                write: true,
                unsplit: text.contains(&b';'),
                // Cannot be read: it may drop or make prepared statements.
                drops_prepared: true,
                prepares: true,
                ..Classification::default()
            }),
        }
    }

    pub fn classify(&self, text: &str) -> Arc<Classification> {
        if text.len() > MAX_CACHED_TEXT {
            return Arc::new(self.classify_uncached(text));
        }
        let shape = shape(text);
        if let Some(hit) = shape.as_deref().and_then(|k| self.shapes.get(k)) {
            return hit;
        }
        if let Some(hit) = self.cache.get(text) {
            return hit;
        }
        let c = Arc::new(self.classify_uncached(text));
        match shape {
            Some(k) if c.by_shape() => {
                self.shapes.insert(k.into_boxed_str(), Arc::clone(&c));
            }
            _ => self.cache.insert(text.into(), Arc::clone(&c)),
        }
        c
    }

    fn classify_uncached(&self, text: &str) -> Classification {
        let comment = leading_comment(text);
        let parsed = match pg_query::parse(text) {
            Ok(p) => p,
            Err(_) => {
                return Classification {
                    write: true,
                    comment,
                    ..Classification::default()
                }
            }
        };
        let mut c = Classification {
            comment,
            ..Classification::default()
        };
        let stmts: Vec<Option<&NodeEnum>> = parsed
            .protobuf
            .stmts
            .iter()
            .map(|s| s.stmt.as_ref().and_then(|n| n.node.as_ref()))
            .collect();
        // The segment being read: its guard point once it has one.
        let mut segment: Option<GuardPoint> = None;
        let mut first_segment = true;
        for (i, node) in stmts.iter().enumerate() {
            let stmt = u32::try_from(i).unwrap_or(u32::MAX);
            let Some(node) = node else {
                c.write = true;
                continue;
            };
            let write = self.is_write(node);
            if write {
                c.write = true;
            }
            let data = !matches!(
                node,
                NodeEnum::TransactionStmt(_)
                    | NodeEnum::VariableSetStmt(_)
                    | NodeEnum::VariableShowStmt(_)
                    | NodeEnum::DiscardStmt(_)
            );
            if data || write {
                let point = segment.get_or_insert(GuardPoint {
                    stmt,
                    first: first_segment,
                    write: false,
                });
                point.write |= write;
            }
            if ends_segment(node) {
                c.guard_points.extend(segment.take());
                first_segment = false;
            }
            if cannot_run_in_block(node) {
                c.outside_block = true;
            }
            if data {
                c.data = true;
                if c.block_after == Some(true) {
                    c.data_in_block = true;
                }
            }
            match node {
                NodeEnum::TransactionStmt(t) => {
                    let k = t.kind;
                    if k == TransactionStmtKind::TransStmtBegin as i32
                        || k == TransactionStmtKind::TransStmtStart as i32
                    {
                        c.block_after = Some(!begins_read_only(t));
                    } else if k == TransactionStmtKind::TransStmtCommit as i32
                        || k == TransactionStmtKind::TransStmtRollback as i32
                        || k == TransactionStmtKind::TransStmtPrepare as i32
                    {
                        c.block_after = Some(false);
                    }
                    if k == TransactionStmtKind::TransStmtCommit as i32
                        || k == TransactionStmtKind::TransStmtPrepare as i32
                    {
                        c.commits = true;
                    }
                }
                NodeEnum::VariableSetStmt(s) => {
                    if let Some(setting) = fence_setting(s) {
                        c.settings.push(setting);
                    }
                }
                NodeEnum::DiscardStmt(d) if d.target == DiscardMode::DiscardAll as i32 => {
                    c.settings.push(FenceSetting::ResetAll);
                    c.drops_prepared = true;
                }
                NodeEnum::DeallocateStmt(_) => c.drops_prepared = true,
                NodeEnum::PrepareStmt(_) => c.prepares = true,
                _ => {}
            }
        }
        c.guard_points.extend(segment);
        // One segment guarded in front of the text: the simple case.
        if let [only] = c.guard_points.as_slice() {
            if only.stmt == 0 && only.first {
                c.guard_points.clear();
            }
        }
        c.single_commit = c.commits
            && matches!(stmts.as_slice(), [Some(NodeEnum::TransactionStmt(t))]
                if t.kind == TransactionStmtKind::TransStmtCommit as i32);
        c
    }

    /// The fail-closed rule for one top-level statement.
    fn is_write(&self, node: &NodeEnum) -> bool {
        match node {
            NodeEnum::SelectStmt(_) => self.writes_anywhere(node),
            NodeEnum::VariableShowStmt(_)
            | NodeEnum::VariableSetStmt(_)
            | NodeEnum::DiscardStmt(_)
            | NodeEnum::ListenStmt(_)
            | NodeEnum::UnlistenStmt(_)
            | NodeEnum::ClosePortalStmt(_)
            | NodeEnum::FetchStmt(_)
            | NodeEnum::DeallocateStmt(_)
            // PREPARE only plans; EXECUTE (not listed) is a write.
            | NodeEnum::PrepareStmt(_) => false,
            NodeEnum::TransactionStmt(t) => {
                t.kind == TransactionStmtKind::TransStmtCommitPrepared as i32
            }
            NodeEnum::ExplainStmt(e) => {
                let analyze = e.options.iter().any(|o| {
                    matches!(&o.node, Some(NodeEnum::DefElem(d)) if d.defname.eq_ignore_ascii_case("analyze"))
                });
                analyze
                    && e
                        .query
                        .as_ref()
                        .and_then(|q| q.node.as_ref())
                        .is_none_or(|q| self.is_write(q))
            }
            NodeEnum::DeclareCursorStmt(d) => d
                .query
                .as_ref()
                .and_then(|q| q.node.as_ref())
                .is_none_or(|q| self.is_write(q)),
            NodeEnum::CopyStmt(c) => {
                // COPY TO a server file or program writes on the server.
                c.is_from
                    || c.is_program
                    || !c.filename.is_empty()
                    || c.query
                        .as_ref()
                        .and_then(|q| q.node.as_ref())
                        .is_some_and(|q| self.is_write(q))
            }
            _ => true,
        }
    }

    fn writes_anywhere(&self, node: &NodeEnum) -> bool {
        match serde_json::to_value(node) {
            Ok(v) => self.walk(&v),
            Err(_) => true,
        }
    }

    fn walk(&self, v: &Value) -> bool {
        match v {
            Value::Object(m) => m.iter().any(|(k, v)| {
                let here = match k.as_str() {
                    "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => true,
                    "SelectStmt" => {
                        !v.get("into_clause").is_none_or(Value::is_null)
                            || v.get("locking_clause")
                                .and_then(Value::as_array)
                                .is_some_and(|a| !a.is_empty())
                    }
                    "FuncCall" => self.names_write_function(v),
                    _ => false,
                };
                here || self.walk(v)
            }),
            Value::Array(a) => a.iter().any(|x| self.walk(x)),
            _ => false,
        }
    }

    fn names_write_function(&self, call: &Value) -> bool {
        let last = call
            .get("funcname")
            .and_then(Value::as_array)
            .and_then(|a| a.last())
            .and_then(|n| n.pointer("/node/String/sval"))
            .and_then(Value::as_str);
        match last {
            // The guard's `fencepost.advance` moves the in-database mark:
            // a client calling it by hand without a current token could
            // push the mark to 2^64-1 and brick the resource, so it is a
            // write whatever `write_functions` says (matched by its last
            // name, so a search_path cannot hide it).
            Some(name) => {
                name.eq_ignore_ascii_case(GUARD_FUNCTION)
                    || self
                        .write_functions
                        .iter()
                        .any(|w| w.eq_ignore_ascii_case(name))
            }
            // A call we cannot name could be anything.
            None => true,
        }
    }
}

/// A statement after which what a guard took may no longer hold: the end
/// of the transaction (`COMMIT`, `END`, `ROLLBACK`, `ABORT`, `PREPARE
/// TRANSACTION`, also `AND CHAIN`), or a `ROLLBACK TO SAVEPOINT`, which
/// releases the locks taken since the savepoint. `BEGIN` is not one: it
/// turns the transaction it finds into a block, or warns inside one.
fn ends_segment(node: &NodeEnum) -> bool {
    let NodeEnum::TransactionStmt(t) = node else {
        return false;
    };
    [
        TransactionStmtKind::TransStmtCommit,
        TransactionStmtKind::TransStmtRollback,
        TransactionStmtKind::TransStmtRollbackTo,
        TransactionStmtKind::TransStmtPrepare,
    ]
    .iter()
    .any(|k| t.kind == *k as i32)
}

/// The last name of the guard's function (`fencepost.advance`).
const GUARD_FUNCTION: &str = "advance";

/// Statements Postgres refuses inside a transaction block (including the
/// implicit one of a multi-statement Query or an extended-protocol batch).
fn cannot_run_in_block(node: &NodeEnum) -> bool {
    match node {
        NodeEnum::VacuumStmt(v) => v.is_vacuumcmd,
        NodeEnum::CreatedbStmt(_)
        | NodeEnum::DropdbStmt(_)
        | NodeEnum::AlterSystemStmt(_)
        | NodeEnum::CreateTableSpaceStmt(_)
        | NodeEnum::DropTableSpaceStmt(_)
        | NodeEnum::CreateSubscriptionStmt(_)
        | NodeEnum::DropSubscriptionStmt(_) => true,
        NodeEnum::IndexStmt(i) => i.concurrent,
        NodeEnum::DropStmt(d) => d.concurrent,
        NodeEnum::ReindexStmt(r) => r.params.iter().any(|p| {
            matches!(&p.node, Some(NodeEnum::DefElem(d)) if d.defname.eq_ignore_ascii_case("concurrently"))
        }),
        _ => false,
    }
}

/// `BEGIN READ ONLY` / `START TRANSACTION READ ONLY`: a block that cannot
/// write, which `strict` mode leaves alone.
fn begins_read_only(t: &pg_query::protobuf::TransactionStmt) -> bool {
    t.options.iter().any(|o| match &o.node {
        Some(NodeEnum::DefElem(d)) if d.defname == "transaction_read_only" => {
            match d.arg.as_ref().and_then(|a| a.node.as_ref()) {
                Some(NodeEnum::AConst(c)) => match &c.val {
                    Some(a_const::Val::Ival(v)) => v.ival != 0,
                    Some(a_const::Val::Boolval(v)) => v.boolval,
                    _ => false,
                },
                _ => false,
            }
        }
        _ => false,
    })
}

/// The text with every numeric literal replaced by `0`, or `None` when the
/// text holds anything that makes that unsafe to decide by hand.
///
/// Two texts of one shape differ only in the digits that begin a number,
/// so the grammar reads them as the same tree with other constants, and
/// whether they write, commit or open a block cannot differ. That holds
/// only where a digit run is surely a number: outside quotes, dollar
/// quotes, comments and escapes, and not inside an identifier. Rather
/// than lex those, any text that contains one of their characters (or
/// any non-ASCII byte) has no shape and is cached by its exact text. A
/// digit run belongs to an identifier when the byte before it is a letter,
/// digit or underscore (`t1`, `col_2`), and is then kept as it is.
pub fn shape(text: &str) -> Option<String> {
    let mut out = String::new();
    shape_into(text, &mut out).then_some(out)
}

/// [`shape`] written into `out` (cleared first; its capacity is reused, so
/// a caller that keeps `out` shapes without allocating); `false` when the
/// text has no shape.
pub fn shape_into(text: &str, out: &mut String) -> bool {
    out.clear();
    let bytes = text.as_bytes();
    if bytes
        .iter()
        .any(|&b| !b.is_ascii() || matches!(b, b'\'' | b'"' | b'$' | b'\\' | 0))
        || text.contains("--")
        || text.contains("/*")
    {
        return false;
    }
    out.reserve(text.len());
    let mut prev: u8 = b' ';
    let mut in_number = false;
    for &b in bytes {
        if b.is_ascii_digit() {
            if in_number {
                prev = b;
                continue;
            }
            if !(prev.is_ascii_alphanumeric() || prev == b'_') {
                in_number = true;
                out.push('0');
                prev = b;
                continue;
            }
        } else {
            in_number = false;
        }
        out.push(char::from(b));
        prev = b;
    }
    true
}

/// Whether `text`'s [`shape`] is `key`, for a `key` that is some text's
/// shape, without writing the shape anywhere.
///
/// A shape is literal runs with a `0` for each number between them, and
/// such a `0` is told from a digit of the text by the byte before it: a
/// number begins after a byte that is not a letter, digit or underscore,
/// and ends with its last digit, so the byte after it is no digit. So
/// `text` has the shape `key` when it is `key`'s literal runs, in order,
/// each number `0` standing for one run of digits. A text that matches
/// has a shape (its bytes are `key`'s but for digits, and a shape holds
/// no quote, comment or non-ASCII byte, nor can two of its neighbouring
/// bytes become `--` or `/*` across a number, whose `0` stays between
/// them), so the check [`shape_into`] makes first need not be made here.
///
/// Why by hand: a session that repeats a text with other numbers (pgbench
/// `-M simple`) found its entry by shaping each text first, about 40
/// instructions a byte (callgrind, `Recent::lookup` 2.6k of 14.4k a
/// statement); here a `memchr` for each number of the key, a `memcmp`
/// per literal run and a scan of each number's digits (the lookup is now
/// about 0.35k).
pub fn shape_matches(text: &[u8], key: &[u8]) -> bool {
    let (mut text, mut key) = (text, key);
    // Whether the byte before `key` is a letter, digit or underscore: at
    // first none, after a number its `0`.
    let mut after_word = false;
    loop {
        // `memchr` for each `0`, then the byte before it: a plain scan
        // that looks at both for every byte cost three times as much
        // (callgrind, `-M simple`: 845 instructions a statement against
        // 277).
        let number = memchr::memchr_iter(b'0', key).find(|&i| {
            let before = if i == 0 {
                after_word
            } else {
                is_word(key[i - 1])
            };
            !before
        });
        let Some(at) = number else {
            return text == key;
        };
        let Some(rest) = text.strip_prefix(&key[..at]) else {
            return false;
        };
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            return false;
        }
        text = &rest[digits..];
        key = &key[at + 1..];
        after_word = true;
    }
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Bytes an entry really costs: its text twice (the key, and the
/// fingerprint and settings derived from it) plus a fixed overhead for the
/// cache's own bookkeeping, the `Arc` and the `Classification`. Measured:
/// about 470 bytes resident per entry of ~56 bytes of text, where counting
/// the text alone let a "32 MiB" cache grow to ~130 MB.
const ENTRY_OVERHEAD: usize = 400;

#[allow(clippy::borrowed_box)] // moka hands the key as it stores it
fn weight(k: &Box<str>, _: &Arc<Classification>) -> u32 {
    u32::try_from(2 * k.len() + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
}

fn fence_setting(s: &VariableSetStmt) -> Option<FenceSetting> {
    let kind = s.kind;
    if kind == VariableSetKind::VarResetAll as i32 {
        return Some(FenceSetting::ResetAll);
    }
    let var = FenceVar::from_name(&s.name)?;
    if kind == VariableSetKind::VarReset as i32 {
        return Some(FenceSetting::Reset(var));
    }
    if kind == VariableSetKind::VarSetDefault as i32 {
        return Some(FenceSetting::Set {
            var,
            value: None,
            local: s.is_local,
        });
    }
    if kind != VariableSetKind::VarSetValue as i32 {
        return None;
    }
    let values: Vec<String> = s
        .args
        .iter()
        .map(|a| match &a.node {
            Some(NodeEnum::AConst(c)) => match &c.val {
                Some(a_const::Val::Sval(v)) => v.sval.clone(),
                Some(a_const::Val::Ival(v)) => v.ival.to_string(),
                Some(a_const::Val::Fval(v)) => v.fval.clone(),
                Some(a_const::Val::Boolval(v)) => v.boolval.to_string(),
                Some(a_const::Val::Bsval(v)) => v.bsval.clone(),
                None => String::new(),
            },
            // Not a constant: a value no token check will accept.
            _ => "\u{fffd}".into(),
        })
        .collect();
    Some(FenceSetting::Set {
        var,
        value: Some(values.join(", ")),
        local: s.is_local,
    })
}

/// Reads `fencing.token=T` and `fencing.resource=R` from a comment at the
/// very start of the text (after whitespace).
pub fn leading_comment(text: &str) -> CommentFence {
    let mut out = CommentFence::default();
    let Some(rest) = text.trim_start().strip_prefix("/*") else {
        return out;
    };
    let Some((body, _)) = rest.split_once("*/") else {
        return out;
    };
    for word in body.split(|c: char| c.is_whitespace() || c == ',') {
        let Some((k, v)) = word.split_once('=') else {
            continue;
        };
        let v = v.trim_matches(|c| c == '\'' || c == '"').to_owned();
        match FenceVar::from_name(k) {
            Some(FenceVar::Token) => out.token = Some(v),
            Some(FenceVar::Resource) => out.resource = Some(v),
            None => {}
        }
    }
    out
}

/// A statement's audit form: normalized by the real parser, so literal
/// values (and the leading fencing comment) never reach the audit log.
pub fn fingerprint(text: &[u8]) -> String {
    const MAX: usize = 1024;
    let Ok(text) = std::str::from_utf8(text) else {
        return format!("(statement of {} bytes, not UTF-8)", text.len());
    };
    let body = strip_leading_comment(text);
    match pg_query::normalize(body) {
        Ok(n) => {
            let n = n.trim();
            if n.len() > MAX {
                let mut end = MAX;
                while !n.is_char_boundary(end) {
                    end -= 1;
                }
                format!("{}...", &n[..end])
            } else {
                n.to_owned()
            }
        }
        Err(_) => format!("(unparsable statement of {} bytes)", text.len()),
    }
}

fn strip_leading_comment(text: &str) -> &str {
    let t = text.trim_start();
    match t.strip_prefix("/*").and_then(|r| r.split_once("*/")) {
        Some((_, rest)) => rest,
        None => t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classifier() -> Classifier {
        Classifier::new(DEFAULT_WRITE_FUNCTIONS, 1 << 20)
    }

    #[test]
    fn an_unknown_write_is_a_write_and_nothing_else() {
        let write = Classification {
            write: true,
            ..Classification::default()
        };
        assert_eq!(Classification::UNKNOWN_WRITE, write);
    }

    #[test]
    fn transaction_blocks_for_strict_mode() {
        let c = classifier();
        let x = c.classify("BEGIN");
        assert_eq!((x.data, x.block_after), (false, Some(true)));
        let x = c.classify("START TRANSACTION READ ONLY");
        assert_eq!(x.block_after, Some(false));
        let x = c.classify("BEGIN READ WRITE; SELECT 1");
        assert!(x.data && x.data_in_block);
        let x = c.classify("SELECT 1; BEGIN");
        assert!(x.data && !x.data_in_block);
        let x = c.classify("SELECT 1");
        assert_eq!((x.data, x.block_after), (true, None));
        assert!(!c.classify("SET fencing.token = 1").data);
        assert_eq!(c.classify("ROLLBACK").block_after, Some(false));
        assert_eq!(c.classify("COMMIT").block_after, Some(false));
    }

    #[test]
    fn guard_points_follow_transaction_ends() {
        let c = classifier();
        let p = |stmt, first, write| GuardPoint { stmt, first, write };
        let table: Vec<(&str, Vec<GuardPoint>)> = vec![
            // One segment guarded in front: nothing to place.
            ("INSERT INTO t VALUES (1)", vec![]),
            ("SELECT 1; INSERT INTO t VALUES (1); COMMIT", vec![]),
            ("SELECT 1; SELECT 2", vec![]),
            ("COMMIT", vec![]),
            ("not sql; COMMIT; INSERT INTO t VALUES (1)", vec![]),
            // After BEGIN (and its isolation level), not before it.
            (
                "BEGIN ISOLATION LEVEL SERIALIZABLE; INSERT INTO t VALUES (1)",
                vec![p(1, true, true)],
            ),
            ("COMMIT; BEGIN; UPDATE t SET a = 1", vec![p(2, false, true)]),
            (
                "UPDATE t SET a = 1; COMMIT; UPDATE t SET a = 2",
                vec![p(0, true, true), p(2, false, true)],
            ),
            (
                "ROLLBACK TO s; SELECT 1; UPDATE t SET a = 1; COMMIT",
                vec![p(1, false, true)],
            ),
            (
                "INSERT INTO t VALUES (1); PREPARE TRANSACTION 'x'; SET x = 1; SELECT 1; \
                 ROLLBACK; END; DELETE FROM t; ABORT",
                vec![p(0, true, true), p(3, false, false), p(6, false, true)],
            ),
            (
                "INSERT INTO t VALUES (1); COMMIT AND CHAIN; INSERT INTO t VALUES (2)",
                vec![p(0, true, true), p(2, false, true)],
            ),
            // Savepoints and their release end nothing.
            (
                "INSERT INTO t VALUES (1); SAVEPOINT s; RELEASE s; INSERT INTO t VALUES (2)",
                vec![],
            ),
            // Semicolons and transaction words in strings, dollar quotes,
            // comments and quoted identifiers are no statements.
            (
                "INSERT INTO t VALUES ('; COMMIT; ') /* ; ROLLBACK; */; -- ; END;\n\
                 SELECT $q$ ; ABORT; $q$, \"x; commit\"",
                vec![],
            ),
        ];
        for (sql, want) in table {
            assert_eq!(c.classify(sql).guard_points, want, "{sql}");
        }
        // Texts of one shape share their points (statement indices).
        let a = c.classify("UPDATE t SET a = 1; COMMIT; UPDATE t SET a = 2");
        let b = c.classify("UPDATE t SET a = 12345; COMMIT; UPDATE t SET a = 2");
        assert_eq!(a.guard_points, b.guard_points);
        // Not UTF-8: split only when there is nothing to split.
        assert!(c.classify_bytes(b"UPDATE t SET a = '\xe9'; COMMIT").unsplit);
        assert!(c.classify_bytes(b"DEALLOCATE '\xe9'").drops_prepared);
        assert!(!c.classify_bytes(b"UPDATE t SET a = '\xe9'").unsplit);
        assert!(!c.classify("UPDATE t SET a = 1; COMMIT").unsplit);
    }

    #[test]
    fn statements_that_drop_prepared_statements() {
        let c = classifier();
        for sql in [
            "DEALLOCATE ALL",
            "DEALLOCATE PREPARE s1",
            "deallocate fencepost_guard_1",
            "DISCARD ALL",
            "SELECT 1; DISCARD ALL",
        ] {
            assert!(c.classify(sql).drops_prepared, "{sql}");
        }
        for sql in [
            "DISCARD PLANS",
            "DISCARD TEMP",
            "SELECT 1",
            "PREPARE p AS SELECT 1",
        ] {
            assert!(!c.classify(sql).drops_prepared, "{sql}");
        }
        assert!(c.classify("PREPARE fencepost_guard_1 AS SELECT 1").prepares);
        assert!(!c.classify("SELECT 1").prepares);
    }

    #[test]
    fn statements_that_cannot_run_in_a_block() {
        let c = classifier();
        for sql in [
            "VACUUM t",
            "vacuum analyze pgbench_branches",
            "CREATE DATABASE x",
            "DROP DATABASE x",
            "CREATE INDEX CONCURRENTLY i ON t (a)",
            "DROP INDEX CONCURRENTLY i",
            "REINDEX (CONCURRENTLY) TABLE t",
            "ALTER SYSTEM SET work_mem = '1MB'",
        ] {
            assert!(c.classify(sql).outside_block, "{sql}");
            assert!(c.classify(sql).write, "{sql}");
        }
        for sql in [
            "ANALYZE t",
            "CREATE INDEX i ON t (a)",
            "INSERT INTO t VALUES (1)",
        ] {
            assert!(!c.classify(sql).outside_block, "{sql}");
        }
    }

    #[test]
    fn reads_and_writes() {
        let c = classifier();
        let table: &[(&str, bool)] = &[
            ("SELECT 1", false),
            ("select * from t where id = 3 order by 1", false),
            ("SELECT count(*) FROM t JOIN u USING (id)", false),
            ("WITH x AS (SELECT 1) SELECT * FROM x", false),
            ("SELECT * FROM (SELECT now()) s UNION SELECT now()", false),
            ("SHOW fencing.token", false),
            ("EXPLAIN SELECT * FROM t", false),
            ("EXPLAIN DELETE FROM t", false),
            ("EXPLAIN ANALYZE SELECT * FROM t", false),
            ("EXPLAIN ANALYZE DELETE FROM t", true),
            ("EXPLAIN (ANALYZE) UPDATE t SET a = 1", true),
            ("BEGIN", false),
            ("BEGIN ISOLATION LEVEL SERIALIZABLE", false),
            ("COMMIT", false),
            ("ROLLBACK", false),
            ("SAVEPOINT a", false),
            ("PREPARE TRANSACTION 'x'", false),
            ("COMMIT PREPARED 'x'", true),
            ("SET search_path = public", false),
            ("SET LOCAL fencing.token = '5'", false),
            ("RESET ALL", false),
            ("DISCARD ALL", false),
            ("LISTEN ch", false),
            ("DECLARE c CURSOR FOR SELECT * FROM t", false),
            ("DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE", true),
            ("FETCH 10 FROM c", false),
            ("PREPARE p AS INSERT INTO t VALUES (1)", false),
            ("EXECUTE p", true),
            ("COPY t TO STDOUT", false),
            ("COPY (SELECT * FROM t) TO STDOUT", false),
            ("COPY t FROM STDIN", true),
            ("COPY t TO '/tmp/out'", true),
            ("COPY t TO PROGRAM 'cat'", true),
            ("COPY (DELETE FROM t RETURNING *) TO STDOUT", true),
            ("INSERT INTO t VALUES (1)", true),
            ("UPDATE t SET a = 1", true),
            ("DELETE FROM t", true),
            (
                "MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN DELETE",
                true,
            ),
            (
                "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
                true,
            ),
            ("SELECT * FROM t FOR UPDATE", true),
            ("SELECT * FROM t FOR SHARE SKIP LOCKED", true),
            ("SELECT * FROM (SELECT * FROM t FOR UPDATE) s", true),
            ("SELECT * INTO u FROM t", true),
            ("SELECT nextval('s')", true),
            ("SELECT pg_catalog.setval('s', 5)", true),
            ("SELECT * FROM t WHERE id = nextval('s')", true),
            ("SELECT lower('A')", false),
            ("CALL p()", true),
            ("DO $$ BEGIN END $$", true),
            ("CREATE TABLE x (a int)", true),
            ("TRUNCATE t", true),
            ("LOCK TABLE t", true),
            ("VACUUM t", true),
            ("NOTIFY ch", true),
            ("SELECT 1; INSERT INTO t VALUES (1)", true),
            ("SELECT 1; SELECT 2", false),
            ("this is not sql", true),
            ("", false),
        ];
        for (sql, write) in table {
            assert_eq!(c.classify(sql).write, *write, "{sql}");
        }
        assert!(c.classify_bytes(b"SELECT '\xff'").write);
    }

    #[test]
    fn configured_functions() {
        let c = Classifier::new(&["bump"], 1 << 20);
        assert!(c.classify("SELECT bump()").write);
        assert!(!c.classify("SELECT nextval('s')").write);
        // The guard's function is a write whatever is configured.
        for sql in [
            "SELECT fencepost.advance('r', '1')",
            "SELECT * FROM \"fencepost\".\"advance\"('r', '1')",
            "SELECT 1 WHERE advance('r', '1') IS NULL",
        ] {
            assert!(c.classify(sql).write, "{sql}");
        }
    }

    #[test]
    fn commits() {
        let c = classifier();
        for (sql, commits, single) in [
            ("COMMIT", true, true),
            ("END", true, true),
            ("commit and chain", true, true),
            ("PREPARE TRANSACTION 'g'", true, false),
            ("INSERT INTO t VALUES (1); COMMIT", true, false),
            ("ROLLBACK", false, false),
            ("BEGIN", false, false),
        ] {
            let k = c.classify(sql);
            assert_eq!((k.commits, k.single_commit), (commits, single), "{sql}");
        }
    }

    #[test]
    fn fencing_settings() {
        let c = classifier();
        let set = |var, value: Option<&str>, local| FenceSetting::Set {
            var,
            value: value.map(str::to_owned),
            local,
        };
        let table: Vec<(&str, Vec<FenceSetting>)> = vec![
            (
                "SET fencing.token = '5'",
                vec![set(FenceVar::Token, Some("5"), false)],
            ),
            (
                "set fencing.token to 7",
                vec![set(FenceVar::Token, Some("7"), false)],
            ),
            (
                "SET fencing.token = 18446744073709551615",
                vec![set(FenceVar::Token, Some("18446744073709551615"), false)],
            ),
            (
                "SET LOCAL fencing.resource = 'orders'",
                vec![set(FenceVar::Resource, Some("orders"), true)],
            ),
            (
                "SET SESSION fencing.token TO DEFAULT",
                vec![set(FenceVar::Token, None, false)],
            ),
            (
                "RESET fencing.token",
                vec![FenceSetting::Reset(FenceVar::Token)],
            ),
            ("RESET ALL", vec![FenceSetting::ResetAll]),
            ("DISCARD ALL", vec![FenceSetting::ResetAll]),
            ("SET search_path = x", vec![]),
            (
                "SET fencing.token = '3'; SET fencing.resource = 'r'",
                vec![
                    set(FenceVar::Token, Some("3"), false),
                    set(FenceVar::Resource, Some("r"), false),
                ],
            ),
        ];
        for (sql, want) in table {
            assert_eq!(c.classify(sql).settings, want, "{sql}");
        }
    }

    #[test]
    fn comments() {
        let c = classifier();
        let k =
            c.classify("/* fencing.token=9 fencing.resource=orders */ INSERT INTO t VALUES (1)");
        assert!(k.write);
        assert_eq!(k.comment.token.as_deref(), Some("9"));
        assert_eq!(k.comment.resource.as_deref(), Some("orders"));
        let k = c.classify("  /*fencing.token='10'*/UPDATE t SET a = 1");
        assert_eq!(k.comment.token.as_deref(), Some("10"));
        assert_eq!(k.comment.resource, None);
        // Only a leading comment counts.
        let k = c.classify("INSERT INTO t VALUES (1) /* fencing.token=9 */");
        assert_eq!(k.comment, CommentFence::default());
        let k = c.classify("/* unrelated */ INSERT INTO t VALUES (1)");
        assert_eq!(k.comment, CommentFence::default());
    }

    #[test]
    fn fingerprints_hide_values() {
        let f = fingerprint(b"/* fencing.token=9 */ INSERT INTO t VALUES (42, 'secret')");
        assert!(!f.contains("secret"), "{f}");
        assert!(!f.contains("42"), "{f}");
        assert!(!f.contains("fencing.token"), "{f}");
        assert!(f.contains("INSERT INTO t"), "{f}");
        assert!(fingerprint(b"\xff\xfe").contains("not UTF-8"));
    }

    proptest::proptest! {
        /// Any text, however broken, gets an answer and a fingerprint.
        #[test]
        fn never_panics(text in ".{0,200}", bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let c = Classifier::new(DEFAULT_WRITE_FUNCTIONS, 1 << 16);
            let _ = c.classify(&text);
            let _ = c.classify_bytes(&bytes);
            let _ = fingerprint(text.as_bytes());
            let _ = fingerprint(&bytes);
            let _ = leading_comment(&text);
        }

        /// Whatever follows a write, the text stays a write.
        #[test]
        fn a_write_anywhere_makes_a_write(prefix in "(SELECT 1; |SHOW x; |BEGIN; |)", suffix in "(; SELECT 2|; COMMIT|)") {
            let c = Classifier::new(DEFAULT_WRITE_FUNCTIONS, 1 << 16);
            let sql = format!("{prefix}INSERT INTO t VALUES (1){suffix}");
            proptest::prop_assert!(c.classify(&sql).write, "{}", sql);
        }
    }

    #[test]
    fn shapes_replace_numbers_only() {
        assert_eq!(
            shape("UPDATE t1 SET v = v + 12 WHERE id = 345").as_deref(),
            Some("UPDATE t1 SET v = v + 0 WHERE id = 0")
        );
        assert_eq!(
            shape("SELECT 1.25, col_22").as_deref(),
            Some("SELECT 0.0, col_22")
        );
        assert_eq!(shape("SELECT a + -17").as_deref(), Some("SELECT a + -0"));
        for unsafe_text in [
            "SELECT '1'",
            "SELECT \"t1\"",
            "SELECT $1",
            "SELECT 1 -- 2",
            "/* fencing.token=5 */ SELECT 1",
            "SELECT E'\\x'",
            "SELECT 'é'",
            "SELECT 1 /* 2 */",
        ] {
            assert_eq!(shape(unsafe_text), None, "{unsafe_text}");
        }
    }

    proptest::proptest! {
        /// `shape_matches` says yes exactly when the text's shape is the
        /// key, for texts with and without a shape (quotes, comments,
        /// digits in identifiers, `-` and `/` next to numbers) against
        /// keys that are shapes of similar texts.
        #[test]
        fn shape_matches_is_shape_equality(
            a in proptest::collection::vec("(SELECT|t1|col_2|a|_|'|\"|\\$|--|-|/\\*|/|\\*|\\.|é|[0-9]{1,4}| |;)", 0..10),
            b in proptest::collection::vec("(SELECT|t1|col_2|a|_|'|-|/|\\*|\\.|[0-9]{1,4}| |;)", 0..10),
        ) {
            let (a, b) = (a.concat(), b.concat());
            // Other numbers (and other digits in identifiers, another
            // shape): texts that match a key, and near misses.
            let (c, d) = (a.replace('1', "23"), a.replace('0', "7"));
            for key in [shape(&a), shape(&b)].into_iter().flatten() {
                for text in [&a, &b, &c, &d] {
                    proptest::prop_assert_eq!(
                        shape_matches(text.as_bytes(), key.as_bytes()),
                        shape(text).as_deref() == Some(key.as_str()),
                        "{:?} against {:?}", text, key
                    );
                }
            }
        }
    }

    #[test]
    fn shape_matches_examples() {
        let key = "SELECT abalance FROM acc WHERE aid = 0";
        assert!(shape_matches(
            b"SELECT abalance FROM acc WHERE aid = 90210",
            key.as_bytes()
        ));
        assert!(shape_matches(
            b"SELECT abalance FROM acc WHERE aid = 0",
            key.as_bytes()
        ));
        assert!(!shape_matches(
            b"SELECT abalance FROM acc WHERE aid = 9 ",
            key.as_bytes()
        ));
        assert!(!shape_matches(
            b"SELECT abalance FROM acc WHERE aid = a1",
            key.as_bytes()
        ));
        assert!(!shape_matches(
            b"SELECT abalance FROM acc WHERE aid = ",
            key.as_bytes()
        ));
        // Digits in an identifier are kept.
        assert!(shape_matches(b"SELECT c1 + 22", b"SELECT c1 + 0"));
        assert!(!shape_matches(b"SELECT c2 + 22", b"SELECT c1 + 0"));
        assert!(shape_matches(b"SELECT 1.25", b"SELECT 0.0"));
        assert!(shape_matches(b"", b""));
    }

    #[test]
    fn one_parse_per_shape_but_settings_keep_their_values() {
        let c = classifier();
        let a = c.classify("SELECT abalance FROM acc WHERE aid = 17");
        let b = c.classify("SELECT abalance FROM acc WHERE aid = 90210");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!a.write);
        let w = c.classify("UPDATE acc SET abalance = abalance + 5 WHERE aid = 3");
        assert!(w.write);
        // Same shape as `SET fencing.token = 0`, different values.
        let s7 = c.classify("SET fencing.token = 7");
        let s8 = c.classify("SET fencing.token = 8");
        let value = |c: &Classification| match c.settings.as_slice() {
            [FenceSetting::Set { value, .. }] => value.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(value(&s7).as_deref(), Some("7"));
        assert_eq!(value(&s8).as_deref(), Some("8"));
    }

    proptest::proptest! {
        /// What the shape cache answers is what a fresh parse of the text
        /// itself says, for texts built from numbers and SQL pieces.
        #[test]
        fn shape_cache_agrees_with_a_fresh_parse(
            parts in proptest::collection::vec(
                "(SELECT|UPDATE t SET a =|INSERT INTO t VALUES \\(|DELETE FROM t WHERE a =|nextval\\(|FOR UPDATE|SET fencing.token =|SET x =|BEGIN|COMMIT|,|;|\\)|\\+|-|\\*|/|<|t1|col_2|1e5|[0-9]{1,25}|[0-9]+\\.[0-9]+| )",
                1..12,
            ),
            seeds in proptest::collection::vec("[0-9]{1,6}", 1..4),
        ) {
            let c = classifier();
            let text = parts.join(" ");
            let cached = c.classify(&text);
            // Classify a few texts of the same shape first, then ask again.
            for s in &seeds {
                let other = text.replace('1', s);
                let fresh = classifier().classify(&other);
                proptest::prop_assert_eq!(&*c.classify(&other), &*fresh, "{} vs {}", text, other);
            }
            proptest::prop_assert_eq!(&*cached, &*classifier().classify(&text));
        }
    }

    #[test]
    fn cache_returns_same_answer() {
        let c = classifier();
        let a = c.classify("INSERT INTO t VALUES (1)");
        let b = c.classify("INSERT INTO t VALUES (1)");
        assert!(Arc::ptr_eq(&a, &b));
    }
}
