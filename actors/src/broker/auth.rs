//! Who may connect, and which topics each client may publish and subscribe to.
//!
//! Passwords are argon2 hashes in PHC form; [`hash_password`] makes one (`colony passwd` uses it).
//! ACL rules work as Mosquitto's do: with no rules everything is allowed; with rules, a client may
//! do only what a rule for its user (or a rule for every client) grants, `%u` and `%c` in a rule's
//! topic standing for the username and client id, and a matching `deny` rule wins. A rule using
//! `%u` never applies to an anonymous client.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use colony_config::kinds::{AclAccess, AclRule, BrokerUser};

use super::topic::{filter_covered_by, filter_matches};

/// Hashes `password` with argon2id and a random salt, in PHC form.
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom(&mut salt)?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

fn getrandom(buf: &mut [u8]) -> Result<(), String> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .map_err(|e| format!("no randomness for a salt: {e}"))
}

/// True when `password` matches the PHC `hash` (false for a hash that does not parse).
pub fn verify_password(hash: &str, password: &[u8]) -> bool {
    PasswordHash::new(hash)
        .map(|h| Argon2::default().verify_password(password, &h).is_ok())
        .unwrap_or(false)
}

/// Why a login was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginRefusal {
    /// No username, and anonymous clients are not allowed.
    AnonymousNotAllowed,
    /// Unknown user or wrong password (not told apart, to the client or in logs).
    BadCredentials,
}

/// Publish or subscribe/receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Subscribe to a filter or receive on a topic.
    Read,
    /// Publish to a topic.
    Write,
}

/// The users and ACL rules in force.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    allow_anonymous: bool,
    users: Vec<BrokerUser>,
    rules: Vec<AclRule>,
}

impl AccessPolicy {
    /// A policy from the broker's settings.
    pub fn new(allow_anonymous: bool, users: Vec<BrokerUser>, rules: Vec<AclRule>) -> Self {
        AccessPolicy {
            allow_anonymous,
            users,
            rules,
        }
    }

    /// Checks a CONNECT's credentials.
    pub fn login(
        &self,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<(), LoginRefusal> {
        let Some(name) = username else {
            return if self.allow_anonymous {
                Ok(())
            } else {
                Err(LoginRefusal::AnonymousNotAllowed)
            };
        };
        let user = self.users.iter().find(|u| u.name == name);
        match (user, password) {
            (Some(u), Some(p)) if verify_password(&u.password_hash, p) => Ok(()),
            _ => Err(LoginRefusal::BadCredentials),
        }
    }

    /// True when the client may `access` `topic` (a topic name for write and receive; a filter
    /// for subscribe).
    pub fn allows(
        &self,
        username: Option<&str>,
        client_id: &str,
        access: Access,
        topic: &str,
        subscribe: bool,
    ) -> bool {
        if self.rules.is_empty() {
            return true;
        }
        let mut granted = false;
        for rule in &self.rules {
            match (&rule.user, username) {
                (Some(u), Some(name)) if u == name => {}
                (None, _) => {}
                _ => continue,
            }
            let Some(pattern) = substitute(&rule.topic, username, client_id) else {
                continue;
            };
            let hit = if subscribe {
                filter_covered_by(topic, &pattern)
            } else {
                filter_matches(&pattern, topic)
            };
            if !hit {
                continue;
            }
            match (rule.access, access) {
                (AclAccess::Deny, _) => return false,
                (AclAccess::Readwrite, _)
                | (AclAccess::Read, Access::Read)
                | (AclAccess::Write, Access::Write) => granted = true,
                _ => {}
            }
        }
        granted
    }
}

/// The rule's topic with `%u` and `%c` filled in; `None` when it needs a username there is not,
/// or a value would smuggle wildcards into the pattern.
fn substitute(topic: &str, username: Option<&str>, client_id: &str) -> Option<String> {
    let mut out = topic.to_owned();
    if out.contains("%u") {
        let u = username?;
        if u.contains(['+', '#', '/']) {
            return None;
        }
        out = out.replace("%u", u);
    }
    if out.contains("%c") {
        if client_id.contains(['+', '#', '/']) {
            return None;
        }
        out = out.replace("%c", client_id);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(user: Option<&str>, topic: &str, access: AclAccess) -> AclRule {
        AclRule {
            user: user.map(str::to_owned),
            topic: topic.to_owned(),
            access,
        }
    }

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password(&h, b"s3cret"));
        assert!(!verify_password(&h, b"s3cre"));
        assert!(!verify_password("not a hash", b"s3cret"));
        assert_ne!(hash_password("s3cret").unwrap(), h, "salted");
    }

    #[test]
    fn login_rules() {
        let h = hash_password("pw").unwrap();
        let users = vec![BrokerUser {
            name: "alice".into(),
            password_hash: h,
        }];
        let p = AccessPolicy::new(false, users.clone(), vec![]);
        assert_eq!(p.login(Some("alice"), Some(b"pw")), Ok(()));
        assert_eq!(
            p.login(Some("alice"), Some(b"no")),
            Err(LoginRefusal::BadCredentials)
        );
        assert_eq!(
            p.login(Some("alice"), None),
            Err(LoginRefusal::BadCredentials)
        );
        assert_eq!(
            p.login(Some("bob"), Some(b"pw")),
            Err(LoginRefusal::BadCredentials)
        );
        assert_eq!(p.login(None, None), Err(LoginRefusal::AnonymousNotAllowed));
        let open = AccessPolicy::new(true, users, vec![]);
        assert_eq!(open.login(None, None), Ok(()));
    }

    #[test]
    fn acl_with_substitution_and_deny() {
        let p = AccessPolicy::new(
            true,
            vec![],
            vec![
                rule(Some("alice"), "home/#", AclAccess::Readwrite),
                rule(None, "devices/%u/#", AclAccess::Readwrite),
                rule(None, "clients/%c/in", AclAccess::Read),
                rule(None, "public/#", AclAccess::Read),
                rule(Some("alice"), "home/secret", AclAccess::Deny),
            ],
        );
        let a = Some("alice");
        assert!(p.allows(a, "c1", Access::Write, "home/x", false));
        assert!(!p.allows(a, "c1", Access::Write, "home/secret", false));
        assert!(!p.allows(Some("bob"), "c2", Access::Write, "home/x", false));
        assert!(p.allows(Some("bob"), "c2", Access::Write, "devices/bob/t", false));
        assert!(!p.allows(Some("bob"), "c2", Access::Write, "devices/alice/t", false));
        assert!(!p.allows(None, "c3", Access::Write, "devices/x/t", false));
        assert!(p.allows(None, "c3", Access::Read, "clients/c3/in", true));
        assert!(!p.allows(None, "c3", Access::Read, "clients/c4/in", true));
        assert!(p.allows(None, "c3", Access::Read, "public/+", true));
        assert!(!p.allows(None, "c3", Access::Read, "#", true));
        assert!(!p.allows(None, "c3", Access::Write, "public/x", false));
        // A username with wildcards cannot widen a %u rule.
        assert!(!p.allows(Some("#"), "c", Access::Write, "devices/a/b", false));
        // No rules: everything goes.
        let open = AccessPolicy::new(true, vec![], vec![]);
        assert!(open.allows(None, "c", Access::Write, "any/thing", false));
    }
}
