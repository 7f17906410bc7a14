//! JSON parsing that accepts only objects where the contract expects one.
//!
//! serde's derived structs also accept a JSON array of the fields in
//! order, so `[null, "bob", ...]` would parse as an envelope. The contract
//! rejects that: two parsers must never read one body differently.

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, Visitor};
use std::fmt;
use std::marker::PhantomData;

/// Deserializes `T` from a JSON object only; arrays and scalars fail.
pub fn deserialize_object<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: de::Deserialize<'de>,
{
    struct ObjectVisitor<T>(PhantomData<T>);

    impl<'de, T: de::Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
        type Value = T;

        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            formatter.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(MapAccessDeserializer::new(map))
        }
    }

    deserializer.deserialize_map(ObjectVisitor(PhantomData))
}

/// Parses a whole JSON document that must be an object.
pub fn from_object_slice<T: DeserializeOwned>(bytes: &[u8]) -> serde_json::Result<T> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = deserialize_object(&mut deserializer)?;
    deserializer.end()?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AckRequest, WireEnvelope};

    #[test]
    fn objects_parse_and_arrays_fail() {
        let envelope: WireEnvelope =
            from_object_slice(br#"{"recipientId":"bob","encryptedData":"aGk="}"#).unwrap();
        assert_eq!(envelope.recipient_id.as_deref(), Some("bob"));
        assert!(
            from_object_slice::<WireEnvelope>(br#"[null,"bob",null,null,"aGk=",null]"#).is_err()
        );
        assert!(from_object_slice::<AckRequest>(b"[0]").is_err());
        assert!(from_object_slice::<AckRequest>(b"7").is_err());
    }

    #[test]
    fn object_rules_still_apply() {
        let duplicate = br#"{"recipientId":"bob","recipientId":"eve","encryptedData":"aGk="}"#;
        assert!(from_object_slice::<WireEnvelope>(duplicate).is_err());
        let unknown = br#"{"recipientId":"bob","encryptedData":"aGk=","x":1}"#;
        assert!(from_object_slice::<WireEnvelope>(unknown).is_err());
        assert!(from_object_slice::<WireEnvelope>(br#"{"recipientId":"bob"} x"#).is_err());
    }
}
