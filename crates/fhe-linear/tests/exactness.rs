//! decrypt(apply(encrypt(X))) == X W^T + b, for every element, over shapes and extreme values.

mod common;

use common::Case;
use fhe_linear::*;

fn check(case: &Case, key: &ClientKey) {
    let layer = case.compile();
    let (got, _) = case.round_trip(key, &layer);
    let want = case.expected();
    let wrong = got.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert_eq!(
        wrong,
        0,
        "{wrong} of {} outputs differ for {:?}",
        want.len(),
        case.spec
    );
}

#[test]
fn random_shapes_decode_exactly() {
    let key = ClientKey::generate(&HFHE_GLWE_2048_V1);
    // (d_in, d_out, tokens, tokens per polynomial)
    let shapes = [
        (100, 3, 2, 1),  // d_in below one block
        (300, 70, 1, 1), // d_in not a multiple of n_i, partial output block
        (257, 1, 3, 1),  // d_out = 1, several tokens
        (130, 40, 7, 4), // several tokens per polynomial, last group partial
        (2048, 96, 16, 8),
        (1000, 33, 5, 2),
    ];
    for (i, (d_in, d_out, tokens, t_b)) in shapes.into_iter().enumerate() {
        check(
            &Case::random(d_in, d_out, tokens, t_b, 100 + i as u64),
            &key,
        );
    }
}

#[test]
fn explicit_layouts_decode_exactly() {
    let key = ClientKey::generate(&HFHE_GLWE_2048_V1);
    let shape = LayerShape::new(200, 50);
    for (n_i, n_o, t_b) in [(2048, 1, 1), (1, 2048, 1), (16, 16, 8), (64, 32, 1)] {
        let layout = BlockLayout { n_i, n_o, t_b };
        let mut case = Case::random(200, 50, 3, 1, n_i as u64);
        case.spec = LayerSpec::new(&HFHE_GLWE_2048_V1, shape, layout).unwrap();
        check(&case, &key);
    }
}

fn constant_case(d_in: usize, d_out: usize, tokens: usize, w: i8, x: i8, bias: i64) -> Case {
    let spec = LayerSpec::choose(&HFHE_GLWE_2048_V1, LayerShape::new(d_in, d_out), 1).unwrap();
    Case {
        spec,
        w: vec![w; d_in * d_out],
        b: vec![bias; d_out],
        x: vec![x as i16; tokens * d_in],
        tokens,
    }
}

#[test]
fn extreme_values_decode_exactly() {
    let key = ClientKey::generate(&HFHE_GLWE_2048_V1);
    let d_in = 2048;
    // Largest positive and negative accumulators, with the bias pushing towards the window edge.
    let edge = (1i64 << 25) - 1 - 128 * 128 * 2048;
    for (w, x, bias) in [
        (-128, -128, 0),
        (-128, 127, 0),
        (127, 127, 0),
        (-128, -128, edge),
        (0, 0, 0),
        (0, -128, -5),
        (127, 0, 0),
    ] {
        check(&constant_case(d_in, 24, 2, w, x, bias), &key);
    }
}

#[test]
fn widest_input_decodes_exactly() {
    let key = ClientKey::generate(&HFHE_GLWE_2048_V1);
    // d_in = 8192 with the worst-case accumulator 8192 * 128 * 128 = 2^27.
    check(&constant_case(8192, 8, 1, -128, -128, 0), &key);
    check(&Case::random(8192, 5, 2, 1, 7), &key);
}

#[test]
fn bias_that_can_overflow_is_refused_at_compile() {
    let spec = LayerSpec::choose(&HFHE_GLWE_2048_V1, LayerShape::new(2048, 2), 1).unwrap();
    let w = vec![-128i8; 2 * 2048];
    let err = CompiledLayer::compile(spec, &w, &[0, 1 << 25]).unwrap_err();
    assert_eq!(err.code(), "bias_out_of_range");
    assert!(CompiledLayer::compile(spec, &w, &[0, (1 << 25) - 1 - (1 << 25)]).is_ok());
}

#[test]
fn data_of_the_wrong_shape_is_refused() {
    let key = ClientKey::generate(&HFHE_GLWE_2048_V1);
    let spec = LayerSpec::choose(&HFHE_GLWE_2048_V1, LayerShape::new(10, 2), 1).unwrap();
    assert_eq!(
        key.encrypt(&spec, &[1; 15], 2).unwrap_err().code(),
        "data_shape_mismatch"
    );
    assert_eq!(
        key.encrypt(&spec, &[], 0).unwrap_err().code(),
        "data_shape_mismatch"
    );
    assert_eq!(
        CompiledLayer::compile(spec, &[1; 19], &[0, 0])
            .unwrap_err()
            .code(),
        "data_shape_mismatch"
    );
}
