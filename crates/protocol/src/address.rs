//! User ids and addresses.
//!
//! An id is 1 to 128 ASCII characters of `[A-Za-z0-9._~@|+=-]`. Its address is
//! `urn:sm:user:<id>`. Wherever an address is read, a bare id means the same
//! user, and addresses compare case-sensitively in their canonical form.

use std::fmt;
use std::sync::Arc;

/// The URN prefix of every user address.
pub const USER_URN_PREFIX: &str = "urn:sm:user:";

/// The maximum length of a user id, in characters.
pub const MAX_ID_LEN: usize = 128;

/// Why a string is not a valid user id or address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressError {
    /// The id is empty.
    Empty,
    /// The id is longer than [`MAX_ID_LEN`] characters.
    TooLong,
    /// The id contains a character outside `[A-Za-z0-9._~@|+=-]`.
    InvalidCharacter,
    /// The string starts with `urn:` but not with `urn:sm:user:`.
    UnknownUrn,
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Self::Empty => "the user id is empty",
            Self::TooLong => "the user id is longer than 128 characters",
            Self::InvalidCharacter => {
                "the user id contains a character outside [A-Za-z0-9._~@|+=-]"
            }
            Self::UnknownUrn => "the address is a URN but not of the form urn:sm:user:<id>",
        };
        f.write_str(text)
    }
}

impl std::error::Error for AddressError {}

/// A validated user address in canonical form, `urn:sm:user:<id>`.
///
/// Clones share one allocation, because a connected user's address is kept
/// by the connection, the hub and presence, and cloned for every message
/// on its way through the router.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address(Arc<str>);

impl Address {
    /// Parses an address or a bare user id.
    pub fn parse(text: &str) -> Result<Self, AddressError> {
        let id = if let Some(rest) = text.strip_prefix("urn:") {
            rest.strip_prefix("sm:user:")
                .ok_or(AddressError::UnknownUrn)?
        } else {
            text
        };
        Self::from_id(id)
    }

    /// Builds the address of a bare user id, such as a token's `sub` claim.
    pub fn from_id(id: &str) -> Result<Self, AddressError> {
        validate_id(id)?;
        let mut canonical = String::with_capacity(USER_URN_PREFIX.len() + id.len());
        canonical.push_str(USER_URN_PREFIX);
        canonical.push_str(id);
        Ok(Self(canonical.into()))
    }

    /// The canonical `urn:sm:user:<id>` form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The bare user id.
    pub fn id(&self) -> &str {
        &self.0[USER_URN_PREFIX.len()..]
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({})", self.0)
    }
}

/// Checks that `id` is a valid bare user id.
pub fn validate_id(id: &str) -> Result<(), AddressError> {
    if id.is_empty() {
        return Err(AddressError::Empty);
    }
    if id.len() > MAX_ID_LEN {
        return Err(AddressError::TooLong);
    }
    let valid = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._~@|+=-".contains(&b));
    if !valid {
        return Err(AddressError::InvalidCharacter);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_id_and_urn_are_the_same_user() {
        let bare = Address::parse("alice").unwrap();
        let urn = Address::parse("urn:sm:user:alice").unwrap();
        assert_eq!(bare, urn);
        assert_eq!(bare.as_str(), "urn:sm:user:alice");
        assert_eq!(bare.id(), "alice");
    }

    #[test]
    fn addresses_compare_case_sensitively() {
        assert_ne!(
            Address::parse("Alice").unwrap(),
            Address::parse("alice").unwrap()
        );
    }

    #[test]
    fn invalid_ids_are_rejected() {
        assert_eq!(Address::parse(""), Err(AddressError::Empty));
        assert_eq!(Address::parse("urn:sm:user:"), Err(AddressError::Empty));
        assert_eq!(Address::parse(&"a".repeat(129)), Err(AddressError::TooLong));
        assert!(Address::parse(&"a".repeat(128)).is_ok());
        for bad in [
            "a b",
            "a*b",
            "a\u{0430}",
            "a\nb",
            "a\u{202e}b",
            "a:b",
            "a/b",
            "a{b}",
        ] {
            assert_eq!(
                Address::parse(bad),
                Err(AddressError::InvalidCharacter),
                "{bad:?}"
            );
        }
        assert_eq!(Address::parse("urn:other:x"), Err(AddressError::UnknownUrn));
    }

    #[test]
    fn every_allowed_punctuation_is_accepted() {
        assert!(Address::parse("a.b_c~d@e|f+g=h-i").is_ok());
    }
}
