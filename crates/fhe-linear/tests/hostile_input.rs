//! Untrusted bytes: every malformed payload is a typed error, never a panic.

mod common;

use common::Case;
use fhe_linear::*;
use proptest::prelude::*;

fn valid_batch() -> (Case, Vec<u8>) {
    let case = Case::random(64, 8, 2, 1, 9);
    let key = ClientKey::generate(&HFHE_GLWE_2048_V1);
    let bytes = key
        .encrypt(&case.spec, &case.x, case.tokens)
        .unwrap()
        .to_bytes();
    (case, bytes)
}

fn code(bytes: &[u8]) -> &'static str {
    EncryptedBatch::from_bytes(bytes, &Limits::default())
        .unwrap_err()
        .code()
}

#[test]
fn malformed_batches_get_typed_errors() {
    let (_, good) = valid_batch();
    assert!(EncryptedBatch::from_bytes(&good, &Limits::default()).is_ok());

    for cut in [0, 3, 10, 55, 56, good.len() / 2, good.len() - 1] {
        assert_eq!(code(&good[..cut]), "ciphertext_truncated", "cut at {cut}");
    }
    let mut long = good.clone();
    long.extend_from_slice(&[0; 9]);
    assert_eq!(code(&long), "ciphertext_trailing_bytes");

    let small = Limits {
        max_bytes: 1000,
        ..Limits::default()
    };
    assert_eq!(
        EncryptedBatch::from_bytes(&good, &small)
            .unwrap_err()
            .code(),
        "ciphertext_too_large"
    );

    let patch = |at: usize, v: &[u8]| {
        let mut b = good.clone();
        b[at..at + v.len()].copy_from_slice(v);
        b
    };
    assert_eq!(code(&patch(0, b"XFHE")), "ciphertext_bad_magic");
    // Version 1 drew its masks from another generator: refused, saying which version is read.
    for version in [1u16, 3] {
        let err = EncryptedBatch::from_bytes(&patch(4, &version.to_le_bytes()), &Limits::default())
            .unwrap_err();
        assert_eq!(err.code(), "ciphertext_unsupported_version");
        assert!(err.to_string().contains("reads version 2"), "{err}");
    }
    assert_eq!(code(&patch(6, &[2])), "ciphertext_wrong_kind");
    assert_eq!(
        code(&patch(8, &77u16.to_le_bytes())),
        "ciphertext_unknown_parameter_set"
    );
    assert_eq!(code(&patch(10, &[0])), "ciphertext_invalid_header");
    assert_eq!(code(&patch(10, &[65])), "ciphertext_invalid_header");
    // Activation widths: 0 is 8 bits, 9..=16 name a wider layer, anything else is refused.
    for a in [1u8, 7, 8, 17, 255] {
        assert_eq!(
            code(&patch(11, &[a])),
            "ciphertext_invalid_header",
            "{a} bits"
        );
    }
    let header = |b: &[u8]| fhe_linear::wire::read_batch_header(b, &Limits::default());
    assert_eq!(header(&good).unwrap().activation_bits, 8);
    assert_eq!(header(&patch(11, &[12])).unwrap().activation_bits, 12);
    assert_eq!(
        code(&patch(12, &0u32.to_le_bytes())),
        "ciphertext_invalid_header"
    );
    assert_eq!(
        code(&patch(20, &0u32.to_le_bytes())),
        "ciphertext_invalid_header"
    );
    assert_eq!(
        code(&patch(20, &u32::MAX.to_le_bytes())),
        "ciphertext_invalid_header"
    );
    assert_eq!(
        code(&patch(24, &3u16.to_le_bytes())),
        "ciphertext_invalid_header"
    );
    assert_eq!(
        code(&patch(48, &u64::MAX.to_le_bytes())),
        "ciphertext_invalid_header"
    );
    // The header-only reader agrees with the full parser.
    let header = fhe_linear::wire::read_batch_header(&good, &Limits::default()).unwrap();
    assert_eq!(header.tokens, 2);
    assert_eq!(
        fhe_linear::wire::read_batch_header(&good[..good.len() - 1], &Limits::default())
            .unwrap_err()
            .code(),
        "ciphertext_truncated"
    );
    // A result is not a batch, and a batch is not a result.
    assert_eq!(
        EncryptedResult::from_bytes(&good, &Limits::default())
            .unwrap_err()
            .code(),
        "ciphertext_wrong_kind"
    );
}

#[test]
fn a_batch_for_another_layer_is_refused_by_apply() {
    let (case, good) = valid_batch();
    let batch = EncryptedBatch::from_bytes(&good, &Limits::default()).unwrap();
    let other = Case::random(64, 9, 1, 1, 1);
    assert_eq!(
        other.compile().apply(&batch).unwrap_err().code(),
        "layer_mismatch"
    );
    let wider = Case::random(65, 8, 1, 1, 1);
    assert_eq!(
        wider.compile().apply(&batch).unwrap_err().code(),
        "layer_mismatch"
    );
    assert!(case.compile().apply(&batch).is_ok());
    // The same layer compiled for wider activations reads the batch's Delta differently.
    let wide = case.spec.with_activation_bits(10).unwrap();
    let layer = CompiledLayer::compile(wide, &case.w, &case.b).unwrap();
    let err = layer.apply(&batch).unwrap_err();
    assert_eq!(err.code(), "layer_mismatch");
    assert!(
        err.to_string().contains("8-bit activations instead of 10"),
        "{err}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = EncryptedBatch::from_bytes(&bytes, &Limits::default());
        let _ = EncryptedResult::from_bytes(&bytes, &Limits::default());
    }

    #[test]
    fn corrupted_headers_never_panic(at in 0usize..56, value in any::<u8>(), extra in 0usize..3) {
        let (case, mut bytes) = valid_batch();
        bytes[at] = value;
        bytes.extend(std::iter::repeat_n(0u8, extra));
        if let Ok(batch) = EncryptedBatch::from_bytes(&bytes, &Limits::default()) {
            // Parsed: the layer either refuses it or computes on it; it never panics.
            let _ = case.compile().apply(&batch);
        }
    }
}

#[test]
fn packed_headers_are_checked() {
    let (_, good) = valid_batch();
    let patch = |at: usize, v: &[u8]| {
        let mut b = good.clone();
        b[at..at + v.len()].copy_from_slice(v);
        b
    };
    // A batch for packed results under the keyless parameter set (no packing keys).
    assert_eq!(code(&patch(7, &[2])), "ciphertext_invalid_header");
    assert_eq!(code(&patch(7, &[9])), "ciphertext_unknown_result_encoding");
    // A batch prepared for packed results is refused by a keyless layer, and vice versa.
    let shape = LayerShape::new(64, 8);
    let layout = BlockLayout {
        n_i: 64,
        n_o: 64,
        t_b: 1,
    };
    let packed = LayerSpec::packed(&HFHE_GLWE_4096_V1, shape, layout).unwrap();
    let keyless = LayerSpec::new(&HFHE_GLWE_4096_V1, shape, layout).unwrap();
    let key = ClientKey::generate(&HFHE_GLWE_4096_V1);
    let x = vec![1i16; 64];
    let (w, b) = (vec![1i8; 64 * 8], vec![0i64; 8]);
    let packed_batch = key.encrypt(&packed, &x, 1).unwrap();
    let keyless_layer = CompiledLayer::compile(keyless, &w, &b).unwrap();
    assert_eq!(
        keyless_layer.apply(&packed_batch).unwrap_err().code(),
        "layer_mismatch"
    );
    let packed_layer = CompiledLayer::compile(packed, &w, &b).unwrap();
    let keyless_batch = key.encrypt(&keyless, &x, 1).unwrap();
    assert_eq!(
        packed_layer.apply(&keyless_batch).unwrap_err().code(),
        "key_required"
    );
    let prepared = PreparedPackingKey::prepare(&PackingKey::generate(&key).unwrap());
    assert_eq!(
        packed_layer
            .apply_packed(&keyless_batch, &prepared)
            .unwrap_err()
            .code(),
        "layer_mismatch"
    );
    // A packed result whose payload length does not match its header.
    let (result, _, _) = packed_layer.apply_packed(&packed_batch, &prepared).unwrap();
    let mut bytes = result.to_bytes();
    assert!(EncryptedResult::from_bytes(&bytes, &Limits::default()).is_ok());
    bytes.pop();
    assert_eq!(
        EncryptedResult::from_bytes(&bytes, &Limits::default())
            .unwrap_err()
            .code(),
        "ciphertext_truncated"
    );
}
