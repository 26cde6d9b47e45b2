//! Keys are not interchangeable, encryption noise is real, and the noise model predicts it.

mod common;

use common::Case;
use fhe_linear::noise::MODEL_SLACK_BITS;
use fhe_linear::*;

fn std_of(v: &[i64]) -> f64 {
    let n = v.len() as f64;
    let mean = v.iter().map(|e| *e as f64).sum::<f64>() / n;
    (v.iter().map(|e| (*e as f64 - mean).powi(2)).sum::<f64>() / n).sqrt()
}

#[test]
fn another_clients_key_does_not_decrypt() {
    let case = Case::random(300, 40, 2, 1, 1);
    let layer = case.compile();
    let alice = ClientKey::generate(&HFHE_GLWE_2048_V1);
    let mallory = ClientKey::generate(&HFHE_GLWE_2048_V1);
    let result = layer
        .apply(&alice.encrypt(&case.spec, &case.x, case.tokens).unwrap())
        .unwrap();
    let want = case.expected();
    assert_eq!(alice.decrypt(&case.spec, &result).unwrap(), want);
    let stolen = mallory.decrypt(&case.spec, &result).unwrap();
    let right = stolen.iter().zip(&want).filter(|(a, b)| a == b).count();
    assert!(
        right <= 2,
        "{right} of {} outputs decrypted under the wrong key",
        want.len()
    );
}

#[test]
fn secret_key_export_roundtrips_and_rejects_garbage() {
    let key = ClientKey::generate(&HFHE_GLWE_2048_V1);
    let bytes = key.export_secret();
    assert_eq!(bytes.len(), 8 + 2048 / 8);
    let again = ClientKey::import_secret(&bytes).unwrap();
    assert_eq!(again.export_secret(), bytes);
    // Debug output names the parameter set and never dumps the key.
    assert!(format!("{key:?}").len() < 100, "{key:?}");
    assert_eq!(
        ClientKey::import_secret(&bytes[..100]).unwrap_err().code(),
        "ciphertext_truncated"
    );
    let mut extra = bytes.clone();
    extra.push(0);
    assert_eq!(
        ClientKey::import_secret(&extra).unwrap_err().code(),
        "ciphertext_trailing_bytes"
    );
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert_eq!(
        ClientKey::import_secret(&bad).unwrap_err().code(),
        "ciphertext_bad_magic"
    );
    // The shared preamble reader names the version this format reads (1), not the ciphertexts'.
    let mut newer = bytes.clone();
    newer[4..6].copy_from_slice(&2u16.to_le_bytes());
    let err = ClientKey::import_secret(&newer).unwrap_err();
    assert_eq!(err.code(), "ciphertext_unsupported_version");
    assert!(err.to_string().contains("reads version 1 only"), "{err}");
    assert_eq!(
        ClientKey::import_secret(&bytes[..3]).unwrap_err().code(),
        "ciphertext_truncated"
    );
    let mut unknown = bytes;
    unknown[6] = 99;
    assert_eq!(
        ClientKey::import_secret(&unknown).unwrap_err().code(),
        "ciphertext_unknown_parameter_set"
    );
}

#[test]
fn encryption_noise_is_present_and_as_specified() {
    let params = &HFHE_GLWE_2048_V1;
    // Guard against a parameter set whose noise rounds to nothing (keys recoverable by algebra).
    assert!(
        params.noise_std() > 2f64.powi(15),
        "noise std {}",
        params.noise_std()
    );
    let case = Case::random(2048, 8, 1, 1, 3);
    let key = ClientKey::generate(params);
    let batch = key.encrypt(&case.spec, &case.x, 1).unwrap();
    let noise = key.input_noise(&case.spec, &batch, &case.x).unwrap();
    let nonzero = noise.iter().filter(|e| **e != 0).count();
    assert!(
        nonzero as f64 > 0.999 * noise.len() as f64,
        "{nonzero} of {} non-zero",
        noise.len()
    );
    let step = 2f64.powi(64 - case.spec.input_bits as i32);
    let expected = (params.noise_std().powi(2) + step * step / 12.0).sqrt();
    let measured = std_of(&noise);
    assert!(
        (measured / expected - 1.0).abs() < 0.05,
        "input noise std {measured} vs {expected}"
    );
}

/// Weights of the largest magnitude with random signs: the worst-case norm, independent terms.
fn extreme_random_sign_weights(len: usize, seed: u64) -> Vec<i8> {
    let mut rng = common::Rng(seed);
    (0..len)
        .map(|_| if rng.next() & 1 == 0 { -128 } else { 127 })
        .collect()
}

#[test]
fn result_noise_matches_the_model() {
    let params = &HFHE_GLWE_2048_V1;
    let key = ClientKey::generate(params);
    for (d_in, d_out, t_b) in [(2048, 512, 1), (8192, 64, 1), (1024, 256, 8)] {
        let spec = LayerSpec::choose(params, LayerShape::new(d_in, d_out), t_b).unwrap();
        let case = Case {
            spec,
            w: extreme_random_sign_weights(d_in * d_out, d_in as u64),
            b: vec![0; d_out],
            x: vec![-128; t_b * d_in],
            tokens: t_b,
        };
        let (got, noise) = case.round_trip(&key, &case.compile());
        assert_eq!(got, case.expected());
        let predicted = spec.noise_budget();
        assert!(predicted.margin_bits() >= MODEL_SLACK_BITS);
        // The model bounds the key's Hamming weight by N (about N/2 in practice), so it may
        // overestimate by up to half a bit; it must never underestimate by more than the slack.
        let gap = (std_of(&noise) / predicted.worst_case_std).log2();
        assert!(
            (-1.0..MODEL_SLACK_BITS).contains(&gap),
            "{spec:?}: measured noise std 2^{:.2}, model 2^{:.2}",
            std_of(&noise).log2(),
            predicted.worst_case_std.log2()
        );
    }
}

#[test]
fn constant_worst_case_weights_stay_far_from_the_threshold() {
    // Identical weights everywhere make the outputs' noise terms coherent: check the largest
    // noise directly rather than a standard deviation.
    let params = &HFHE_GLWE_2048_V1;
    let key = ClientKey::generate(params);
    for (d_in, d_out) in [(2048, 256), (8192, 32)] {
        let spec = LayerSpec::choose(params, LayerShape::new(d_in, d_out), 1).unwrap();
        for (w, x) in [(-128i8, -128i8), (127, -128)] {
            let case = Case {
                spec,
                w: vec![w; d_in * d_out],
                b: vec![0; d_out],
                x: vec![x as i16; 2 * d_in],
                tokens: 2,
            };
            let (got, noise) = case.round_trip(&key, &case.compile());
            assert_eq!(got, case.expected());
            let predicted = spec.noise_budget();
            let worst = noise.iter().map(|e| e.unsigned_abs()).max().unwrap() as f64;
            assert!(
                worst < TAIL_Z_FRACTION * predicted.half_delta,
                "largest noise 2^{:.1} vs threshold 2^{:.1}",
                worst.log2(),
                predicted.half_delta.log2()
            );
        }
    }
}

/// The largest noise of a few hundred outputs stays well inside the 7.2-sigma budget.
const TAIL_Z_FRACTION: f64 = 0.6;

#[test]
fn chosen_layouts_respect_the_budget() {
    let params = &HFHE_GLWE_2048_V1;
    for (d_in, d_out) in [
        (2048, 6144),
        (2048, 2048),
        (2048, 8192),
        (8192, 2048),
        (64, 64),
    ] {
        for t_b in [1, 8, 16] {
            let spec = LayerSpec::choose(params, LayerShape::new(d_in, d_out), t_b).unwrap();
            let b = spec.noise_budget();
            assert!(b.margin_bits() >= MODEL_SLACK_BITS, "{spec:?}");
            assert_eq!(spec.layout.n_i * spec.layout.n_o * t_b, 2048);
        }
    }
    // Too many outputs per polynomial for d_in = 8192: refused, not silently wrong.
    let too_wide = BlockLayout {
        n_i: 1,
        n_o: 2048,
        t_b: 1,
    };
    assert!(LayerSpec::new(params, LayerShape::new(8192, 4), too_wide).is_err());
}

/// A layer widened by extra product columns (outlier channels spread over several columns) is
/// budgeted at its widened width: the result noise grows with the number of columns and the
/// plaintext needs one more bit past each power of two, so a layout that holds `d_in` columns
/// can be refused at `d_in + extra`, never accepted with a margin that would not decode.
#[test]
fn a_layer_widened_past_its_budget_is_refused() {
    let params = &HFHE_GLWE_2048_V1;
    let (d_in, extra, d_out) = (8192, 512, 64);
    // The layout with the most outputs per polynomial that d_in columns still allow.
    let widest = (0..=11)
        .rev()
        .map(|log_n_o| BlockLayout {
            n_i: 2048 >> log_n_o,
            n_o: 1 << log_n_o,
            t_b: 1,
        })
        .find(|layout| LayerSpec::new(params, LayerShape::new(d_in, d_out), *layout).is_ok())
        .expect("some layout holds d_in = 8192");
    let spec = LayerSpec::new(params, LayerShape::new(d_in, d_out), widest).unwrap();
    assert!(spec.noise_budget().margin_bits() >= MODEL_SLACK_BITS);
    // The same layout at the widened width: even at full wire precision the model leaves less
    // than the slack, and the spec is refused with the reason.
    let wide = LayerShape::new(d_in + extra, d_out);
    let full =
        fhe_linear::noise::budget(params, wide, widest, ResultEncoding::Keyless, 8, (64, 64));
    assert!(full.margin_bits() < MODEL_SLACK_BITS, "{full:?}");
    let err = LayerSpec::new(params, wide, widest).unwrap_err();
    assert!(err.to_string().contains("noise budget"), "{err}");
    // A smaller layout holds the widened layer, and decrypts it exactly with the worst weights.
    let spec = LayerSpec::choose(params, wide, 1).unwrap();
    assert!(spec.layout.n_o < widest.n_o);
    let key = ClientKey::generate(params);
    let case = Case {
        spec,
        w: extreme_random_sign_weights(wide.d_in * d_out, 7),
        b: vec![0; d_out],
        x: vec![-128; wide.d_in],
        tokens: 1,
    };
    let (got, _) = case.round_trip(&key, &case.compile());
    assert_eq!(got, case.expected());
}

#[test]
fn wider_activations_decode_exactly_within_their_budget_and_are_refused_beyond_it() {
    let params = &HFHE_GLWE_2048_V1;
    let key = ClientKey::generate(params);
    let shape = LayerShape::new(576, 96);
    let narrow = LayerSpec::choose(params, shape, 1).unwrap();
    for a in [10u32, 12, 14] {
        let spec = LayerSpec::choose_for(params, shape, 1, a).unwrap();
        assert_eq!(spec.activation_bits, a);
        let budget = spec.noise_budget();
        assert!(
            budget.margin_bits() >= MODEL_SLACK_BITS,
            "{a} bits: {budget:?}"
        );
        // Every activation bit takes one plaintext bit: Delta shrinks by as many.
        assert_eq!(spec.output_delta_log2() + a - 8, narrow.output_delta_log2());
        // Random values over the full width, then the extremes with the worst weights.
        let mut case = Case::random(shape.d_in, shape.d_out, 2, 1, 40 + a as u64);
        case.spec = spec;
        case.x = common::Rng(a as u64).activations(2 * shape.d_in, a);
        let (got, _) = case.round_trip(&key, &case.compile());
        assert_eq!(got, case.expected(), "{a} bits, random");
        let lowest = -(1i32 << (a - 1)) as i16;
        for (w, x) in [(-128i8, lowest), (127, lowest), (-128, -lowest - 1)] {
            case.w = vec![w; shape.d_in * shape.d_out];
            case.x = vec![x; 2 * shape.d_in];
            let (got, noise) = case.round_trip(&key, &case.compile());
            assert_eq!(got, case.expected(), "{a} bits, w {w}, x {x}");
            let worst = noise.iter().map(|e| e.unsigned_abs()).max().unwrap() as f64;
            assert!(worst < TAIL_Z_FRACTION * budget.half_delta, "{a} bits");
        }
        // A value beyond the width is refused before anything is encrypted.
        let mut x = vec![0i16; shape.d_in];
        x[5] = -lowest;
        let err = key.encrypt(&spec, &x, 1).unwrap_err();
        assert_eq!(err.code(), "activation_out_of_range", "{a} bits");
    }
    // The 8-bit layout does not hold 14-bit activations: the budget refuses it, naming why, and
    // the chosen 14-bit layout is a smaller one. No layout of this set holds 16 bits.
    let err = narrow.with_activation_bits(14).unwrap_err();
    assert!(err.to_string().contains("noise budget"), "{err}");
    let wide = LayerSpec::choose_for(params, shape, 1, 14).unwrap();
    assert!(wide.layout.n_o < narrow.layout.n_o, "{:?}", wide.layout);
    let full = fhe_linear::noise::budget(
        params,
        shape,
        narrow.layout,
        ResultEncoding::Keyless,
        14,
        (64, 64),
    );
    assert!(full.margin_bits() < MODEL_SLACK_BITS, "{full:?}");
    let err = LayerSpec::choose_for(params, shape, 1, 16).unwrap_err();
    assert!(err.to_string().contains("16-bit activations"), "{err}");
    // Widths outside the supported range are refused.
    for a in [7, 17] {
        assert!(
            LayerSpec::choose_for(params, shape, 1, a).is_err(),
            "{a} bits"
        );
    }
}
