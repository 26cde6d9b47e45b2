//! Every way to forge or misuse a license is refused, each with its own code.

use base64::Engine;
use license::*;

const AUD: &str = "gateway.example";
const NOW: u64 = 1_800_000_000;

fn claims() -> LicenseClaims {
    LicenseClaims {
        jti: "lic-1".into(),
        sub: "acme".into(),
        iss: "vendor".into(),
        aud: AUD.into(),
        model: "phi-1_5".into(),
        layers: vec!["layers.1.mixer.Wqkv".into()],
        quota_tokens: 1000,
        quota_period: QuotaPeriod::Month,
        rate_limit_per_minute: 600,
        max_in_flight: 4,
        iat: NOW - 10,
        nbf: NOW - 10,
        exp: NOW + 3600,
    }
}

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

fn code(set: &KeySet, token: &str) -> &'static str {
    set.verify(token, AUD, NOW).unwrap_err().code()
}

#[test]
fn valid_licenses_verify_and_keys_rotate() {
    let old = SigningKey::generate("2026-01");
    let new = SigningKey::generate("2026-06");
    let set = KeySet::new(&[old.public().unwrap(), new.public().unwrap()]).unwrap();
    for key in [&old, &new] {
        let token = key.issue(&claims()).unwrap();
        assert_eq!(set.verify(&token, AUD, NOW).unwrap(), claims());
    }
    // The key set survives its file form; the signing key its PEM form.
    let again = KeySet::from_json(&set.to_json()).unwrap();
    let reloaded = SigningKey::from_pem("2026-06", &new.to_pem().unwrap()).unwrap();
    assert!(again
        .verify(&reloaded.issue(&claims()).unwrap(), AUD, NOW)
        .is_ok());
    assert!(!format!("{new:?}").contains("PRIVATE"));
    assert!(claims().allows_layer("layers.1.mixer.Wqkv") && !claims().allows_layer("lm_head"));
}

#[test]
fn forged_and_misused_licenses_are_refused() {
    let key = SigningKey::generate("k1");
    let public = key.public().unwrap();
    let set = KeySet::new(std::slice::from_ref(&public)).unwrap();
    let token = key.issue(&claims()).unwrap();
    let parts: Vec<&str> = token.split('.').collect();

    // alg: none, unsigned.
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#),
        parts[1]
    );
    assert_eq!(code(&set, &none), "license_algorithm_refused");

    // HS256 "signed" with the public key as the HMAC secret.
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header {
            kid: Some("k1".into()),
            ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256)
        },
        &claims(),
        &jsonwebtoken::EncodingKey::from_secret(public.public_key_pem.as_bytes()),
    )
    .unwrap();
    assert_eq!(code(&set, &hs), "license_algorithm_refused");

    // Unknown and missing kid.
    let stranger = SigningKey::generate("k2").issue(&claims()).unwrap();
    assert_eq!(code(&set, &stranger), "license_unknown_kid");
    let no_kid = format!(
        "{}.{}.{}",
        b64(br#"{"alg":"EdDSA","typ":"JWT"}"#),
        parts[1],
        parts[2]
    );
    assert_eq!(code(&set, &no_kid), "license_missing_kid");

    // Another vendor's key under our kid.
    let impostor = SigningKey::generate("k1").issue(&claims()).unwrap();
    assert_eq!(code(&set, &impostor), "license_bad_signature");

    // Tampered payload: a bigger quota.
    let mut bigger = claims();
    bigger.quota_tokens = 1_000_000;
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64(&serde_json::to_vec(&bigger).unwrap()),
        parts[2]
    );
    assert_eq!(code(&set, &forged), "license_bad_signature");

    // Wrong audience, expired, not yet valid.
    assert_eq!(
        set.verify(&token, "other-gateway", NOW).unwrap_err().code(),
        "license_wrong_audience"
    );
    assert_eq!(
        set.verify(&token, AUD, NOW + 3600 + LEEWAY_SECONDS + 1)
            .unwrap_err()
            .code(),
        "license_expired"
    );
    assert_eq!(
        set.verify(&token, AUD, NOW - 10 - LEEWAY_SECONDS - 1)
            .unwrap_err()
            .code(),
        "license_not_yet_valid"
    );

    // Garbage.
    for junk in ["", "abc", "a.b", "a.b.c.d", "!!!.e30.x"] {
        assert_eq!(code(&set, junk), "license_malformed", "{junk}");
    }
}

fn admin(role: Role) -> AdminClaims {
    AdminClaims {
        jti: "adm-1".into(),
        sub: "alice@vendor".into(),
        iss: "vendor".into(),
        aud: admin_audience(AUD),
        role,
        iat: NOW - 10,
        nbf: NOW - 10,
        exp: NOW + 600,
    }
}

#[test]
fn admin_tokens_and_licenses_never_pass_for_each_other() {
    let key = SigningKey::generate("k1");
    let set = KeySet::new(&[key.public().unwrap()]).unwrap();
    let admin_aud = admin_audience(AUD);
    let token = key.issue_admin(&admin(Role::Compliance)).unwrap();
    let verified = set.verify_admin(&token, &admin_aud, NOW).unwrap();
    assert_eq!(verified.role, Role::Compliance);
    assert_eq!(verified.sub, "alice@vendor");
    // An admin token is not a license, and a license is not an admin token, whatever the
    // audience they are checked against.
    for aud in [AUD, admin_aud.as_str()] {
        assert!(set.verify(&token, aud, NOW).is_err());
    }
    let license = key.issue(&claims()).unwrap();
    for aud in [AUD, admin_aud.as_str()] {
        assert!(set.verify_admin(&license, aud, NOW).is_err());
    }
    // A license re-labelled with the admin audience still lacks a role.
    let mut relabelled = claims();
    relabelled.aud = admin_aud.clone();
    let relabelled = key.issue(&relabelled).unwrap();
    assert_eq!(
        set.verify_admin(&relabelled, &admin_aud, NOW)
            .unwrap_err()
            .code(),
        "license_malformed"
    );
    // Admin tokens expire like licenses; roles order by power.
    assert_eq!(
        set.verify_admin(&token, &admin_aud, NOW + 3600)
            .unwrap_err()
            .code(),
        "license_expired"
    );
    assert!(Role::Admin > Role::Compliance);
    assert_eq!("admin".parse::<Role>().unwrap(), Role::Admin);
    assert!("root".parse::<Role>().is_err());
}
