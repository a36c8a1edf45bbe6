//! The config of a test server, built as values instead of `format!`-ed
//! TOML: sections and keys are set one by one, values are TOML values
//! (rendered by the `toml` crate, so quoting is never a test's problem),
//! and every listener gets a socket bound to port 0 *now*, held until the
//! server takes it. An in-process server ([`super::InProc`]) serves on
//! that very socket, so no other test can take the port in between; a
//! process ([`super::Server`]) is handed the address.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;

use toml::{Table, Value};

/// One `[section]` or `[[section]]` entry: its keys, and the listener
/// bound for its `listen`, if it has one.
pub struct Section {
    keys: Table,
    listener: Option<TcpListener>,
    addr: Option<SocketAddr>,
}

impl Section {
    pub fn new() -> Section {
        Section {
            keys: Table::new(),
            listener: None,
            addr: None,
        }
    }

    /// A listener section (`[[http]]`, `[[postgres]]`, `[elector]`,
    /// `[admin]`) whose upstream is `upstream` (empty: none).
    pub fn to(upstream: impl Into<String>) -> Section {
        let upstream = upstream.into();
        let s = Section::new();
        if upstream.is_empty() {
            s
        } else {
            s.set("upstream", upstream)
        }
    }

    /// Sets `key` to a value (a string, integer, bool or list of them).
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Section {
        self.keys.insert(key.to_owned(), value.into());
        self
    }

    /// Sets `key` to a value written as TOML (inline tables, arrays of
    /// them): `raw("routes", r#"[{ prefix = "/", resource = "r" }]"#)`.
    pub fn raw(mut self, key: &str, toml_value: &str) -> Section {
        let table: Table = format!("v = {toml_value}")
            .parse()
            .unwrap_or_else(|e| panic!("not a TOML value: {toml_value}: {e}"));
        let value = table.get("v").cloned().expect("the parsed value");
        self.keys.insert(key.to_owned(), value);
        self
    }

    /// Listens on `addr` instead of a socket bound now (a test that
    /// needs the same port across restarts of several servers).
    pub fn listen(mut self, addr: SocketAddr) -> Section {
        self.addr = Some(addr);
        self
    }

    /// Binds the section's listener (unless an address was given) and
    /// returns its address.
    fn bind(&mut self) -> SocketAddr {
        if let Some(a) = self.addr {
            return a;
        }
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a test listener");
        let a = l.local_addr().expect("listener address");
        self.listener = Some(l);
        self.addr = Some(a);
        a
    }

    fn render(&self) -> Table {
        let mut t = Table::new();
        if let Some(a) = self.addr {
            t.insert("listen".into(), Value::String(a.to_string()));
        }
        t.extend(self.keys.clone());
        t
    }
}

impl Default for Section {
    fn default() -> Self {
        Section::new()
    }
}

/// A whole `fencepost.toml`.
pub struct Conf {
    store: String,
    /// `[log]`, `[audit]`, `[fencing]`: plain tables.
    tables: Vec<(String, Section)>,
    admin: Option<Section>,
    elector: Option<Section>,
    http: Vec<Section>,
    postgres: Vec<Section>,
    pub env: Vec<(String, String)>,
    /// Whether the store is expected to answer: an in-process server
    /// over one waits for its migration before the test begins.
    pub store_up: bool,
}

impl Conf {
    /// A config over the store at `url`.
    pub fn store(url: impl Into<String>) -> Conf {
        Conf {
            store: url.into(),
            tables: Vec::new(),
            admin: None,
            elector: None,
            http: Vec::new(),
            postgres: Vec::new(),
            env: Vec::new(),
            store_up: true,
        }
    }

    /// A config over a store the test has taken away (or never had).
    pub fn unreachable_store(url: impl Into<String>) -> Conf {
        Conf {
            store_up: false,
            ..Conf::store(url)
        }
    }

    /// A config over a SQLite store in `dir`.
    pub fn sqlite(dir: &Path) -> Conf {
        Conf::store(format!("sqlite://{}/fencepost.db", dir.display()))
    }

    pub fn store_url(&self) -> &str {
        &self.store
    }

    /// Sets `key` of a plain table (`log`, `audit`, `fencing`).
    pub fn set(&mut self, table: &str, key: &str, value: impl Into<Value>) -> &mut Conf {
        let value = value.into();
        match self.tables.iter_mut().find(|(n, _)| n == table) {
            Some((_, s)) => {
                s.keys.insert(key.to_owned(), value);
            }
            None => self
                .tables
                .push((table.to_owned(), Section::new().set(key, value))),
        }
        self
    }

    /// Adds `[admin]`; returns its address.
    pub fn admin(&mut self, mut s: Section) -> SocketAddr {
        let a = s.bind();
        self.admin = Some(s);
        a
    }

    /// Adds `[elector]`; returns its address.
    pub fn elector(&mut self, mut s: Section) -> SocketAddr {
        let a = s.bind();
        self.elector = Some(s);
        a
    }

    /// Adds an `[[http]]` proxy; returns its address.
    pub fn http(&mut self, mut s: Section) -> SocketAddr {
        let a = s.bind();
        self.http.push(s);
        a
    }

    /// Adds a `[[postgres]]` proxy; returns its address.
    pub fn postgres(&mut self, mut s: Section) -> SocketAddr {
        let a = s.bind();
        self.postgres.push(s);
        a
    }

    /// An environment variable for the server (`FENCEPOST_*`).
    pub fn env(&mut self, key: &str, value: &str) -> &mut Conf {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The config as TOML text.
    pub fn render(&self) -> String {
        let mut doc = Table::new();
        doc.insert("store".into(), Value::String(self.store.clone()));
        for (name, s) in &self.tables {
            doc.insert(name.clone(), Value::Table(s.render()));
        }
        if let Some(s) = &self.admin {
            doc.insert("admin".into(), Value::Table(s.render()));
        }
        if let Some(s) = &self.elector {
            doc.insert("elector".into(), Value::Table(s.render()));
        }
        for (name, list) in [("http", &self.http), ("postgres", &self.postgres)] {
            if !list.is_empty() {
                let arr = list.iter().map(|s| Value::Table(s.render())).collect();
                doc.insert(name.into(), Value::Array(arr));
            }
        }
        toml::to_string(&doc).expect("render the config")
    }

    /// The bound listeners, for a server in this process.
    pub(super) fn take_listeners(&mut self) -> HeldListeners {
        // A section given its address binds it now.
        let mut take = |s: &mut Section| {
            s.listener.take().or_else(|| {
                s.addr
                    .map(|a| TcpListener::bind(a).unwrap_or_else(|e| panic!("bind {a}: {e}")))
            })
        };
        HeldListeners {
            elector: self.elector.as_mut().and_then(&mut take),
            http: self.http.iter_mut().filter_map(&mut take).collect(),
            postgres: self.postgres.iter_mut().filter_map(&mut take).collect(),
            admin: self.admin.as_mut().and_then(&mut take),
        }
    }

    /// Closes the held listeners, for a server in another process (which
    /// binds the addresses itself).
    pub(super) fn release(&mut self) {
        let sections = self.admin.iter_mut().chain(self.elector.iter_mut());
        for s in sections
            .chain(self.http.iter_mut())
            .chain(self.postgres.iter_mut())
        {
            s.listener = None;
        }
    }
}

/// Listeners bound by [`Conf`], not yet handed to a server.
pub(super) struct HeldListeners {
    pub elector: Option<TcpListener>,
    pub http: Vec<TcpListener>,
    pub postgres: Vec<TcpListener>,
    pub admin: Option<TcpListener>,
}

impl HeldListeners {
    /// As the library takes them; call inside a runtime.
    pub fn into_tokio(self) -> fencepost::serve::Listeners {
        fn conv(l: TcpListener) -> tokio::net::TcpListener {
            l.set_nonblocking(true).expect("nonblocking listener");
            tokio::net::TcpListener::from_std(l).expect("a tokio listener")
        }
        fencepost::serve::Listeners {
            elector: self.elector.map(conv),
            http: self.http.into_iter().map(conv).collect(),
            postgres: self.postgres.into_iter().map(conv).collect(),
            admin: self.admin.map(conv),
        }
    }
}
