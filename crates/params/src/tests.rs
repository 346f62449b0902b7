use super::*;

fn ring_with(root: &Key) -> (Keyring, Vec<StoredKek>) {
    let mut ring = Keyring::default();
    let stored = vec![ring.rotate(root, "default").unwrap()];
    (ring, stored)
}

#[test]
fn a_value_opens_with_its_keys_and_context_only() {
    let root = Key::generate().unwrap();
    let (ring, stored) = ring_with(&root);
    let env = ring
        .seal("default", "/shop/prod/db/password@1", b"hunter2")
        .unwrap();
    assert_eq!(env.kek_version, 1);
    // Nothing of the value shows in what is stored.
    let json = serde_json::to_string(&env).unwrap();
    assert!(!json.contains("hunter2"));
    assert_eq!(
        ring.open("/shop/prod/db/password@1", &env).unwrap(),
        b"hunter2"
    );
    // Moved to another parameter or version, it does not open.
    assert!(matches!(
        ring.open("/shop/prod/db/password@2", &env),
        Err(CryptoError::Open { .. })
    ));
    // Reopened from storage with the root key, the same value comes back.
    let again = Keyring::unlock(&root, &stored).unwrap();
    assert_eq!(
        again.open("/shop/prod/db/password@1", &env).unwrap(),
        b"hunter2"
    );
    // A fresh data key per value: the same text seals differently.
    let twice = ring
        .seal("default", "/shop/prod/db/password@1", b"hunter2")
        .unwrap();
    assert_ne!(twice.value, env.value);
    assert_ne!(twice.data_key, env.data_key);
}

#[test]
fn a_wrong_root_key_is_refused_naming_the_key() {
    let root = Key::generate().unwrap();
    let (_, stored) = ring_with(&root);
    let wrong = Key::generate().unwrap();
    let err = Keyring::unlock(&wrong, &stored).err().unwrap();
    assert_eq!(
        err.to_string(),
        "key-encryption key `default` version 1 cannot be opened: a different root key than the one it was sealed with, or a damaged record"
    );
}

#[test]
fn tampering_with_any_part_is_detected() {
    let root = Key::generate().unwrap();
    let (ring, _) = ring_with(&root);
    let env = ring.seal("default", "/a@1", b"value").unwrap();
    let mut flipped = env.clone();
    flipped.value.data[0] ^= 1;
    assert!(ring.open("/a@1", &flipped).is_err());
    let mut flipped = env.clone();
    flipped.data_key.data[3] ^= 1;
    assert!(ring.open("/a@1", &flipped).is_err());
    let mut other_version = env.clone();
    other_version.kek_version = 2;
    assert_eq!(
        ring.open("/a@1", &other_version).err().unwrap(),
        CryptoError::NoKek {
            name: "default".into(),
            version: 2
        }
    );
}

#[test]
fn rotation_and_rewrap_keep_every_old_version_readable() {
    let root = Key::generate().unwrap();
    let (mut ring, mut stored) = ring_with(&root);
    let old = ring.seal("default", "/a@1", b"one").unwrap();
    stored.push(ring.rotate(&root, "default").unwrap());
    let new = ring.seal("default", "/a@2", b"two").unwrap();
    assert_eq!((old.kek_version, new.kek_version), (1, 2));
    let ring = Keyring::unlock(&root, &stored).unwrap();
    assert_eq!(ring.open("/a@1", &old).unwrap(), b"one");
    let rewrapped = ring.rewrap("/a@1", &old).unwrap().expect("under version 1");
    assert_eq!(rewrapped.kek_version, 2);
    assert_eq!(
        rewrapped.value, old.value,
        "the value's ciphertext is untouched"
    );
    assert_eq!(ring.open("/a@1", &rewrapped).unwrap(), b"one");
    assert_eq!(ring.rewrap("/a@2", &new).unwrap(), None);
}

#[test]
fn an_imported_key_is_the_next_version() {
    let root = Key::generate().unwrap();
    let (mut ring, _) = ring_with(&root);
    let mine = Key::parse(&"ab".repeat(32)).unwrap();
    let stored = ring.import(&root, "default", mine).unwrap();
    assert_eq!(stored.version, 2);
    let env = ring.seal("default", "/b@1", b"x").unwrap();
    assert_eq!(env.kek_version, 2);
}

#[test]
fn root_keys_read_from_hex_or_base64_and_errors_never_echo_them() {
    let hex = "0f".repeat(32);
    assert_eq!(Key::parse(&hex).unwrap().to_hex(), hex);
    let b64 = base64::engine::general_purpose::STANDARD.encode([15u8; 32]);
    assert_eq!(Key::parse(&format!(" {b64}\n")).unwrap().to_hex(), hex);
    let secret_ish = "correct horse battery staple";
    let err = Key::parse(secret_ish).err().unwrap().to_string();
    assert!(!err.contains("horse"), "{err}");
    assert!(err.contains("32 bytes"), "{err}");
    let short = base64::engine::general_purpose::STANDARD.encode([1u8; 16]);
    assert!(Key::parse(&short)
        .err()
        .unwrap()
        .to_string()
        .contains("found 16 bytes"));
}

#[test]
fn sealed_bytes_are_stored_as_base64_and_old_arrays_still_read() {
    let sealed = Sealed {
        nonce: vec![1, 2, 3],
        data: vec![255, 0],
    };
    let json = serde_json::to_string(&sealed).unwrap();
    assert_eq!(json, r#"{"nonce":"AQID","data":"/wA="}"#);
    assert_eq!(serde_json::from_str::<Sealed>(&json).unwrap(), sealed);
    let old: Sealed = serde_json::from_str(r#"{"nonce":[1,2,3],"data":[255,0]}"#).unwrap();
    assert_eq!(old, sealed);
}
