//! The session's fencing variables (`fencing.token`, `fencing.resource`),
//! tracked as Postgres tracks GUCs, from the startup packet and the
//! settings [`wire::pg::classify`] finds in statements.

use wire::pg::frame;
use wire::pg::{FenceSetting, FenceVar, StartupKind, StartupPacket};

/// The fencing variables of the session, tracked as Postgres tracks GUCs:
/// session values that only a transaction that ends well keeps, and
/// `SET LOCAL` values that end with their transaction.
///
/// Only what is known to have committed is stored; the settings of the
/// open transaction and of statements not yet answered are replayed on top
/// when a write needs the current values. Replaying (rather than applying
/// at once and undoing on failure) keeps a pipelined client's later SETs
/// when an earlier transaction fails.
#[derive(Debug, Default, Clone)]
pub(super) struct Vars {
    /// From the startup packet: what RESET returns to.
    startup: [Option<String>; 2],
    /// As of the last transaction that ended well.
    committed: [Option<String>; 2],
}

/// The variables as a statement sees them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct View {
    session: [Option<String>; 2],
    /// `SET LOCAL` in the current transaction; `Some(None)` hides a value.
    local: [Option<Option<String>>; 2],
}

fn idx(v: FenceVar) -> usize {
    match v {
        FenceVar::Token => 0,
        FenceVar::Resource => 1,
    }
}

/// An empty value means "not set", as `SET fencing.token = ''` intends.
pub(super) fn non_empty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.trim().is_empty())
}

impl Vars {
    pub(super) fn from_startup(p: &StartupPacket) -> Vars {
        let mut startup: [Option<String>; 2] = [None, None];
        let mut put = |k: &str, v: &str| match k.to_ascii_lowercase().as_str() {
            "fencing.token" => startup[0] = non_empty(Some(v.to_owned())),
            "fencing.resource" => startup[1] = non_empty(Some(v.to_owned())),
            _ => {}
        };
        if let StartupKind::Startup { params, .. } = &p.kind {
            // Postgres takes unknown startup parameters as settings too.
            for (k, v) in params {
                put(k, v);
            }
        }
        if let Some(opts) = p.param("options") {
            for (k, v) in frame::option_settings(opts) {
                put(&k, &v);
            }
        }
        Vars {
            committed: startup.clone(),
            startup,
        }
    }

    /// The committed values with `settings` replayed on top.
    pub(super) fn view<'a>(&self, settings: impl IntoIterator<Item = &'a FenceSetting>) -> View {
        let mut v = View {
            session: self.committed.clone(),
            local: [None, None],
        };
        for s in settings {
            self.apply(&mut v, s);
        }
        v
    }

    fn apply(&self, v: &mut View, s: &FenceSetting) {
        match s {
            FenceSetting::Set { var, value, local } => {
                let i = idx(*var);
                let value = match value {
                    Some(x) => non_empty(Some(x.clone())),
                    None => self.startup[i].clone(),
                };
                if *local {
                    v.local[i] = Some(value);
                } else {
                    v.session[i] = value;
                    v.local[i] = None;
                }
            }
            FenceSetting::Reset(var) => {
                let i = idx(*var);
                v.session[i] = self.startup[i].clone();
                v.local[i] = None;
            }
            FenceSetting::ResetAll => {
                v.session = self.startup.clone();
                v.local = [None, None];
            }
        }
    }

    /// A transaction that made `settings` committed: keep its session
    /// values (its `SET LOCAL`s end with it).
    pub(super) fn commit<'a>(&mut self, settings: impl IntoIterator<Item = &'a FenceSetting>) {
        self.committed = self.view(settings).session;
    }
}

impl View {
    pub(super) fn effective(&self, i: usize) -> Option<String> {
        match &self.local[i] {
            Some(v) => v.clone(),
            None => self.session[i].clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn set(var: FenceVar, v: &str, local: bool) -> FenceSetting {
        FenceSetting::Set {
            var,
            value: Some(v.into()),
            local,
        }
    }

    #[test]
    fn vars_follow_transactions() {
        let mut v = Vars {
            startup: [Some("1".into()), Some("r".into())],
            committed: [Some("1".into()), Some("r".into())],
        };
        let tok = |view: View| view.effective(0);
        let s5 = set(FenceVar::Token, "5", false);
        let l6 = set(FenceVar::Token, "6", true);
        assert_eq!(tok(v.view([&s5])).as_deref(), Some("5"));
        assert_eq!(tok(v.view([&s5, &l6])).as_deref(), Some("6"));
        // Commit: the session value stays, the local one ends.
        v.commit([&s5, &l6]);
        assert_eq!(tok(v.view([])).as_deref(), Some("5"));
        // A session SET after SET LOCAL overrides it.
        let s7 = set(FenceVar::Token, "7", false);
        assert_eq!(tok(v.view([&l6, &s7])).as_deref(), Some("7"));
        let reset = FenceSetting::Reset(FenceVar::Token);
        assert_eq!(tok(v.view([&reset])).as_deref(), Some("1"));
        let empty = set(FenceVar::Resource, "", false);
        assert_eq!(v.view([&empty]).effective(1), None);
        assert_eq!(
            v.view([&empty, &FenceSetting::ResetAll])
                .effective(1)
                .as_deref(),
            Some("r")
        );
        let default_local = FenceSetting::Set {
            var: FenceVar::Token,
            value: None,
            local: true,
        };
        assert_eq!(tok(v.view([&default_local])).as_deref(), Some("1"));
    }

    #[test]
    fn startup_vars() {
        let p = StartupPacket {
            raw: Bytes::new(),
            kind: StartupKind::Startup {
                version: 3 << 16,
                params: vec![
                    ("user".into(), "u".into()),
                    (
                        "options".into(),
                        "-c fencing.token=5 -c fencing.resource=orders".into(),
                    ),
                ],
            },
        };
        let v = Vars::from_startup(&p).view([]);
        assert_eq!(v.effective(0).as_deref(), Some("5"));
        assert_eq!(v.effective(1).as_deref(), Some("orders"));
    }
}
