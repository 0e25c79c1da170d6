//! Password hashes for SMTP AUTH principals: argon2id in PHC string form, never clear text.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Argon2, PasswordHash, PasswordVerifier};

pub use argon2::password_hash::Error as HashError;

/// Hashes a password with argon2id and a random salt, as `herald-relay hash-password` prints it.
/// Deliberately slow: keep it off an async runtime.
pub fn hash(password: &str) -> Result<String, HashError> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// Does `password` match the PHC string `hash`? False for a malformed hash. Deliberately slow.
pub fn verify(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// Is `hash` a PHC string argon2 can check (what `users[].password_hash` must hold)?
pub fn check_format(hash: &str) -> Result<(), HashError> {
    PasswordHash::new(hash).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_password_only() {
        let h = hash("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify(&h, "s3cret"));
        assert!(!verify(&h, "s3cret "));
        assert!(!verify("not a hash", "s3cret"));
        assert!(check_format("plain").is_err());
    }
}
