//! Console users as the cluster shares them: a name, a role, the addresses a `user` reads mail
//! of, and an argon2id password hash (PHC string; the password itself is never stored, sent
//! between units or logged). The table travels as the clustered setting `console.users`.

use crate::policy::Role;
use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, SaltString};
use argon2::{Argon2, PasswordVerifier};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// What they may do.
    pub role: Role,
    /// argon2id hash of the password, PHC string format.
    pub password: String,
    /// For the `user` role: the addresses whose mail they read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

/// Every user, by name.
pub type Users = BTreeMap<String, User>;

/// A name a user may have: 1–64 of `[A-Za-z0-9._@-]`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?}: a user name is 1-64 letters, digits and . _ @ -"
        ))
    }
}

/// Whether a table of users is sound: names, hashes that parse, addresses for every `user`.
pub fn check(users: &Users) -> Result<(), String> {
    for (name, u) in users {
        check_name(name)?;
        PasswordHash::new(&u.password)
            .map_err(|e| format!("user {name}: the password hash does not parse: {e}"))?;
        if u.role == Role::User && u.addresses.is_empty() {
            return Err(format!(
                "user {name}: the user role needs at least one address"
            ));
        }
        for a in &u.addresses {
            if !a.contains('@') || a.chars().any(|c| c.is_whitespace() || c == '<' || c == '>') {
                return Err(format!("user {name}: {a:?} is not a mail address"));
            }
        }
    }
    Ok(())
}

/// The argon2id hash of `password` with a fresh salt (the crate's default cost: 19 MiB, two
/// passes).
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing the password: {e}"))
}

/// Whether `password` matches `hash`. A hash that does not parse matches nothing.
pub fn verify_password(hash: &str, password: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(h) => Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

/// A random password for a new user: 24 characters from an alphabet without look-alikes.
pub fn random_password() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rngs::OsRng;
    (0..24)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_password_only() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password(&h, "correct horse"));
        assert!(!verify_password(&h, "correct horsf"));
        assert!(!verify_password("not a hash", "correct horse"));
        assert_ne!(h, hash_password("correct horse").unwrap(), "salted");
    }

    #[test]
    fn tables_are_checked() {
        let hash = hash_password("x").unwrap();
        let user = |role, addresses: &[&str]| User {
            role,
            password: hash.clone(),
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
        };
        let table: [(&str, User, Option<&str>); 5] = [
            ("ann", user(Role::Admin, &[]), None),
            ("u", user(Role::User, &["u@example.org"]), None),
            (
                "u",
                user(Role::User, &[]),
                Some("needs at least one address"),
            ),
            (
                "u",
                user(Role::User, &["nobody"]),
                Some("not a mail address"),
            ),
            ("a b", user(Role::Auditor, &[]), Some("a user name is")),
        ];
        for (name, u, want) in table {
            let users = Users::from([(name.to_string(), u)]);
            match (check(&users), want) {
                (Ok(()), None) => {}
                (Err(e), Some(w)) => assert!(e.contains(w), "{e}"),
                (got, _) => panic!("{name}: {got:?}, wanted {want:?}"),
            }
        }
        let bad = Users::from([(
            "x".to_string(),
            User {
                role: Role::Admin,
                password: "plain".into(),
                addresses: vec![],
            },
        )]);
        assert!(check(&bad).unwrap_err().contains("does not parse"));
    }

    #[test]
    fn random_passwords_differ_and_are_long() {
        let (a, b) = (random_password(), random_password());
        assert_eq!(a.len(), 24);
        assert_ne!(a, b);
    }
}
