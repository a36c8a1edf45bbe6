//! The local audit spool: an append-only file of audit records, one JSON
//! object per line, synced (`fdatasync`) before the refusals it holds are
//! answered. It holds records only while the store is slow or down; the
//! shipper sends them to the store when it answers again and cuts what was
//! shipped off the front of the file (a rewrite of the rest, renamed over
//! the file), removing the file once it is empty.
//!
//! One spool per process: the default name is derived from the store and
//! the process's listen addresses (see [`default_path`]), so replicas that
//! share a directory do not share a spool, and a restart finds its own.
//!
//! Why a file of JSON lines and not an embedded database: the spool is
//! written only in the rare outage, read once when the store returns, and
//! an operator may need to read it by hand; an append and one sync per
//! batch is all it needs.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use fencing::AuditRecord;
use store::Store;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("audit spool {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("audit spool {path} is full ({max} bytes)")]
    Full { path: String, max: u64 },
    #[error("audit spool task failed: {0}")]
    Task(String),
    #[error("store: {0}")]
    Store(#[from] store::StoreError),
}

pub struct Spool {
    path: PathBuf,
    max_bytes: u64,
    /// The spool holds records not yet shipped: new batches go behind them.
    active: AtomicBool,
    /// One append or cut at a time in this process.
    lock: tokio::sync::Mutex<()>,
}

impl Spool {
    /// The spool at `path`. A torn last line (a crash during an append, so
    /// never synced, so never answered) is cut off; a spool left with
    /// records by an earlier process is shipped first.
    pub fn open(path: PathBuf, max_bytes: u64) -> Result<Spool, SpoolError> {
        let active = match File::options().read(true).write(true).open(&path) {
            Ok(mut f) => {
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes).map_err(|e| io(&path, e))?;
                let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                if whole < bytes.len() {
                    tracing::warn!(path = %path.display(), bytes = bytes.len() - whole, "audit spool: torn last line cut off");
                    f.set_len(whole as u64).map_err(|e| io(&path, e))?;
                    f.sync_all().map_err(|e| io(&path, e))?;
                }
                if whole > 0 {
                    tracing::info!(path = %path.display(), bytes = whole, "audit spool holds records from an earlier run; shipping them first");
                }
                whole > 0
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(io(&path, e)),
        };
        Ok(Spool {
            path,
            max_bytes,
            active: AtomicBool::new(active),
            lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Whether records wait in the spool.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Appends `records` and syncs them.
    pub async fn append(&self, records: Vec<AuditRecord>) -> Result<(), SpoolError> {
        let _one = self.lock.lock().await;
        let path = self.path.clone();
        let max = self.max_bytes;
        blocking(move || append_sync(&path, &records, max)).await?;
        self.active.store(true, Ordering::Release);
        Ok(())
    }

    /// Ships what the spool holds to `store`, `batch` records per
    /// transaction, and cuts what was shipped. The store call runs without
    /// the lock, so batches keep being spooled meanwhile. Returns how many
    /// records were shipped.
    pub async fn ship(&self, store: &dyn Store, batch: usize) -> Result<usize, SpoolError> {
        let path = self.path.clone();
        let lines = {
            let _one = self.lock.lock().await;
            blocking(move || read_lines(&path)).await?
        };
        let mut shipped_bytes = 0u64;
        let mut shipped = 0usize;
        let mut result = Ok(());
        for chunk in lines.chunks(batch.max(1)) {
            let records: Vec<AuditRecord> = chunk.iter().filter_map(|(_, r)| r.clone()).collect();
            match store.append_audit(&records).await {
                Ok(()) => {
                    shipped += records.len();
                    shipped_bytes = chunk.last().map_or(shipped_bytes, |(end, _)| *end);
                }
                Err(e) => {
                    result = Err(SpoolError::Store(e));
                    break;
                }
            }
        }
        if shipped_bytes > 0 {
            let _one = self.lock.lock().await;
            let path = self.path.clone();
            let empty = blocking(move || cut_front(&path, shipped_bytes)).await?;
            if empty {
                self.active.store(false, Ordering::Release);
            }
        }
        result.map(|()| shipped)
    }
}

fn io(path: &Path, source: std::io::Error) -> SpoolError {
    SpoolError::Io {
        path: path.display().to_string(),
        source,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, SpoolError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SpoolError::Task(e.to_string()))?
}

fn append_sync(path: &Path, records: &[AuditRecord], max: u64) -> Result<(), SpoolError> {
    let mut bytes = Vec::with_capacity(records.len() * 256);
    for r in records {
        // A record is plain data: serializing it cannot fail.
        if let Ok(line) = serde_json::to_vec(r) {
            bytes.extend_from_slice(&line);
            bytes.push(b'\n');
        }
    }
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io(path, e))?;
    let len = f.metadata().map_err(|e| io(path, e))?.len();
    if len + bytes.len() as u64 > max {
        return Err(SpoolError::Full {
            path: path.display().to_string(),
            max,
        });
    }
    f.write_all(&bytes).map_err(|e| io(path, e))?;
    f.sync_data().map_err(|e| io(path, e))?;
    if len == 0 {
        // A new file: its directory entry must survive a crash too.
        sync_dir(path)?;
    }
    Ok(())
}

/// Every whole line with the offset just past it, and its record (`None`
/// for a line that does not decode: logged, and cut with the rest).
type Line = (u64, Option<AuditRecord>);

fn read_lines(path: &Path) -> Result<Vec<Line>, SpoolError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io(path, e)),
    };
    let mut out = Vec::new();
    let mut start = 0usize;
    for (i, b) in bytes.iter().enumerate() {
        if *b != b'\n' {
            continue;
        }
        let line = &bytes[start..i];
        let rec = match serde_json::from_slice::<AuditRecord>(line) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(path = %path.display(), offset = start, error = %e, "audit spool: a line does not decode; skipped");
                metrics::counter!(crate::metrics::AUDIT_DROPPED).increment(1);
                None
            }
        };
        start = i + 1;
        out.push((start as u64, rec));
    }
    Ok(out)
}

/// Removes the first `n` bytes; returns whether the spool is now empty
/// (and removed).
fn cut_front(path: &Path, n: u64) -> Result<bool, SpoolError> {
    let mut f = File::open(path).map_err(|e| io(path, e))?;
    f.seek(SeekFrom::Start(n)).map_err(|e| io(path, e))?;
    let mut rest = Vec::new();
    f.read_to_end(&mut rest).map_err(|e| io(path, e))?;
    if rest.is_empty() {
        fs::remove_file(path).map_err(|e| io(path, e))?;
        sync_dir(path)?;
        return Ok(true);
    }
    let tmp = path.with_extension("spool-tmp");
    let mut t = File::create(&tmp).map_err(|e| io(&tmp, e))?;
    t.write_all(&rest).map_err(|e| io(&tmp, e))?;
    t.sync_data().map_err(|e| io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io(path, e))?;
    sync_dir(path)?;
    Ok(false)
}

fn sync_dir(path: &Path) -> Result<(), SpoolError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))
}

/// The spool a process uses when `[audit] spool` names none: beside the
/// SQLite file (`<file>.audit-spool`), or for a Postgres store
/// `fencepost-audit-<hash>.spool` in the working directory, the hash over
/// the store URL and the process's listen addresses.
pub fn default_path(store_url: &str, listens: &[String]) -> PathBuf {
    if let Some(rest) = store_url.strip_prefix("sqlite:") {
        let file = rest.trim_start_matches("//");
        let file = file.split('?').next().unwrap_or(file);
        if !file.is_empty() && !file.starts_with(':') {
            return PathBuf::from(format!("{file}.audit-spool"));
        }
    }
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in std::iter::once(store_url).chain(listens.iter().map(String::as_str)) {
        for b in part.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    PathBuf::from(format!("fencepost-audit-{h:016x}.spool"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_paths() {
        assert_eq!(
            default_path("sqlite:///var/lib/fp/fencepost.db", &[]),
            PathBuf::from("/var/lib/fp/fencepost.db.audit-spool")
        );
        assert_eq!(
            default_path("sqlite://fencepost.db?mode=rwc", &[]),
            PathBuf::from("fencepost.db.audit-spool")
        );
        let a = default_path("postgres://db/x", &["127.0.0.1:8080".into()]);
        let b = default_path("postgres://db/x", &["127.0.0.1:8081".into()]);
        assert_ne!(a, b, "replicas in one directory get their own spool");
        assert_eq!(
            a,
            default_path("postgres://db/x", &["127.0.0.1:8080".into()])
        );
    }

    #[test]
    fn a_torn_tail_is_cut_and_whole_lines_are_kept() {
        let dir = std::env::temp_dir().join(format!("fp-spool-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.spool");
        let rec = AuditRecord::new(
            1,
            Some("r"),
            fencing::Protocol::Http,
            fencing::Reason::Stale,
            Some(1),
            Some(2),
            "c".into(),
            "PUT /x",
        );
        append_sync(&path, &[rec.clone(), rec.clone()], 1 << 20).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"torn").unwrap();
        let spool = Spool::open(path.clone(), 1 << 20).unwrap();
        assert!(spool.active());
        let lines = read_lines(&path).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].1.as_ref(), Some(&rec));
        assert!(!cut_front(&path, lines[0].0).unwrap());
        assert_eq!(read_lines(&path).unwrap().len(), 1);
        assert!(cut_front(&path, lines[0].0).unwrap());
        assert!(!path.exists());
        assert!(matches!(
            append_sync(&path, &[rec], 10),
            Err(SpoolError::Full { .. })
        ));
        let _ = fs::remove_dir_all(&dir);
    }
}
