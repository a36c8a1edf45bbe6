//! The session's fencing variables (`fencing.token`, `fencing.resource`),
//! tracked as Postgres tracks GUCs, from the startup packet and the
//! settings [`wire::pg::classify`] finds in statements.
//!
//! Values are parsed once, when they are set ([`Setting::parse`],
//! [`Vars::from_startup`]): a resource name or a token, or the typed reason
//! why not, which the decision reads as they are.

use fencing::input::{self, FenceInput, InputError};
use fencing::{Presented, ResourceName};
use wire::pg::frame;
use wire::pg::{FenceSetting, FenceVar, StartupKind, StartupPacket};

/// A resource as set: a name, or why not (unset is [`InputError::Missing`]).
pub(super) type Resource = Result<ResourceName, InputError>;
/// A token as set: a parsed token, or why not.
pub(super) type Token = Result<Presented, InputError>;

/// An empty (or blank) value means "not set", as `SET fencing.token = ''`
/// intends.
fn present(v: &str) -> Option<&str> {
    Some(v).filter(|s| !s.trim().is_empty())
}

/// A resource from session text: blank is missing.
pub(super) fn parse_resource(v: Option<&str>) -> Resource {
    match v.and_then(present) {
        None => Err(InputError::Missing),
        Some(s) => input::resource(s).map(|r| r.to_name()),
    }
}

/// A token from session text: blank is missing.
pub(super) fn parse_token(v: Option<&str>) -> Token {
    match v.and_then(present) {
        None => Err(InputError::Missing),
        Some(s) => input::token(s),
    }
}

/// Both variables' values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Values {
    resource: Resource,
    token: Token,
}

impl Default for Values {
    fn default() -> Self {
        Values {
            resource: Err(InputError::Missing),
            token: Err(InputError::Missing),
        }
    }
}

/// One change to the fencing variables, parsed from a [`FenceSetting`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Setting {
    /// `SET [LOCAL] fencing.resource`; `None` is `TO DEFAULT`.
    Resource {
        value: Option<Resource>,
        local: bool,
    },
    /// `SET [LOCAL] fencing.token`; `None` is `TO DEFAULT`.
    Token {
        value: Option<Token>,
        local: bool,
    },
    Reset(FenceVar),
    ResetAll,
}

impl Setting {
    pub(super) fn parse(s: &FenceSetting) -> Setting {
        match s {
            FenceSetting::Set {
                var: FenceVar::Resource,
                value,
                local,
            } => Setting::Resource {
                value: value.as_deref().map(|v| parse_resource(Some(v))),
                local: *local,
            },
            FenceSetting::Set {
                var: FenceVar::Token,
                value,
                local,
            } => Setting::Token {
                value: value.as_deref().map(|v| parse_token(Some(v))),
                local: *local,
            },
            FenceSetting::Reset(var) => Setting::Reset(*var),
            FenceSetting::ResetAll => Setting::ResetAll,
        }
    }
}

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
    startup: Values,
    /// As of the last transaction that ended well.
    committed: Values,
}

/// One variable as a statement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Var<T> {
    session: T,
    /// `SET LOCAL` in the current transaction.
    local: Option<T>,
}

impl<T> Var<T> {
    fn new(session: T) -> Self {
        Var {
            session,
            local: None,
        }
    }

    fn set(&mut self, value: T, local: bool) {
        if local {
            self.local = Some(value);
        } else {
            self.session = value;
            self.local = None;
        }
    }

    fn effective(&self) -> &T {
        self.local.as_ref().unwrap_or(&self.session)
    }
}

/// The variables as a statement sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct View {
    resource: Var<Resource>,
    token: Var<Token>,
}

impl Vars {
    pub(super) fn from_startup(p: &StartupPacket) -> Vars {
        let mut resource = None;
        let mut token = None;
        let mut put = |k: &str, v: &str| match FenceVar::from_name(k) {
            Some(FenceVar::Resource) => resource = Some(v.to_owned()),
            Some(FenceVar::Token) => token = Some(v.to_owned()),
            None => {}
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
        let startup = Values {
            resource: parse_resource(resource.as_deref()),
            token: parse_token(token.as_deref()),
        };
        Vars {
            committed: startup.clone(),
            startup,
        }
    }

    /// The committed values with `settings` replayed on top.
    /// The committed values, borrowed: what a statement sees when no
    /// setting is pending (see `Shared::settled`).
    pub(super) fn committed(&self) -> (&Resource, &Token) {
        (&self.committed.resource, &self.committed.token)
    }

    pub(super) fn view<'a>(&self, settings: impl IntoIterator<Item = &'a Setting>) -> View {
        let mut v = View {
            resource: Var::new(self.committed.resource.clone()),
            token: Var::new(self.committed.token.clone()),
        };
        for s in settings {
            self.apply(&mut v, s);
        }
        v
    }

    fn apply(&self, v: &mut View, s: &Setting) {
        match s {
            Setting::Resource { value, local } => v.resource.set(
                value
                    .clone()
                    .unwrap_or_else(|| self.startup.resource.clone()),
                *local,
            ),
            Setting::Token { value, local } => v.token.set(
                value.clone().unwrap_or_else(|| self.startup.token.clone()),
                *local,
            ),
            Setting::Reset(FenceVar::Resource) => {
                v.resource = Var::new(self.startup.resource.clone());
            }
            Setting::Reset(FenceVar::Token) => v.token = Var::new(self.startup.token.clone()),
            Setting::ResetAll => {
                v.resource = Var::new(self.startup.resource.clone());
                v.token = Var::new(self.startup.token.clone());
            }
        }
    }

    /// A transaction that made `settings` committed: keep its session
    /// values (its `SET LOCAL`s end with it).
    pub(super) fn commit<'a>(&mut self, settings: impl IntoIterator<Item = &'a Setting>) {
        let v = self.view(settings);
        self.committed = Values {
            resource: v.resource.session,
            token: v.token.session,
        };
    }
}

impl View {
    /// What a statement with no comment of its own presents.
    pub(super) fn input(&self) -> FenceInput<'_> {
        FenceInput {
            resource: self
                .resource
                .effective()
                .as_ref()
                .map(ResourceName::as_ref_name)
                .map_err(Clone::clone),
            token: self.token.effective().clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use fencing::TokenError;

    use super::*;

    fn set(var: FenceVar, v: &str, local: bool) -> Setting {
        Setting::parse(&FenceSetting::Set {
            var,
            value: Some(v.into()),
            local,
        })
    }

    fn token(view: View) -> Token {
        view.token.effective().clone()
    }

    #[test]
    fn vars_follow_transactions() {
        let mut v = Vars {
            startup: Values {
                resource: parse_resource(Some("r")),
                token: parse_token(Some("1")),
            },
            ..Vars::default()
        };
        v.committed = v.startup.clone();
        let plain = |n| Ok(Presented::Plain(n));
        let s5 = set(FenceVar::Token, "5", false);
        let l6 = set(FenceVar::Token, "6", true);
        assert_eq!(token(v.view([&s5])), plain(5));
        assert_eq!(token(v.view([&s5, &l6])), plain(6));
        // Commit: the session value stays, the local one ends.
        v.commit([&s5, &l6]);
        assert_eq!(token(v.view([])), plain(5));
        // A session SET after SET LOCAL overrides it.
        let s7 = set(FenceVar::Token, "7", false);
        assert_eq!(token(v.view([&l6, &s7])), plain(7));
        let reset = Setting::Reset(FenceVar::Token);
        assert_eq!(token(v.view([&reset])), plain(1));
        let empty = set(FenceVar::Resource, "", false);
        assert_eq!(v.view([&empty]).input().resource, Err(InputError::Missing));
        assert_eq!(
            v.view([&empty, &Setting::ResetAll])
                .input()
                .resource
                .map(|r| r.as_str()),
            Ok("r")
        );
        let default_local = Setting::parse(&FenceSetting::Set {
            var: FenceVar::Token,
            value: None,
            local: true,
        });
        assert_eq!(token(v.view([&default_local])), plain(1));
        // Parsed when set: a bad value is a typed error from then on.
        let bad = set(FenceVar::Token, "5x", false);
        assert_eq!(
            token(v.view([&bad])),
            Err(InputError::Token(TokenError::NotDecimal))
        );
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
        assert_eq!(v.input().token, Ok(Presented::Plain(5)));
        assert_eq!(v.input().resource.map(|r| r.as_str()), Ok("orders"));
    }
}
