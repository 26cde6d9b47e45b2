//! TLS configurations from PEM files made by a test CA, and the errors of bad files.

use test_support::tls::TestCa;
use tls::{read_certificates, ClientTls, ServerTls};

#[test]
fn configs_from_files_and_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let server = ca.issue("localhost");
    let tls = ServerTls {
        cert: server.cert.clone(),
        key: server.key.clone(),
        client_ca: Some(ca.cert.clone()),
    };
    tls.config().unwrap();
    let client = ClientTls {
        ca_cert: Some(ca.cert.clone()),
        identity: Some((server.cert.clone(), server.key.clone())),
    };
    client.config().unwrap();
    // The private CA is trusted beside the system's roots.
    let ca_der = read_certificates(&ca.cert).unwrap().remove(0);
    assert!(client.roots().unwrap().contains(&ca_der));

    // A key that is not the certificate's.
    let other = ca.issue("other");
    let wrong = ServerTls {
        key: other.key.clone(),
        ..tls.clone()
    };
    let err = wrong.config().unwrap_err().to_string();
    assert!(err.contains("does not fit the certificate"), "{err}");
    // A missing file names itself; a file without certificates says so.
    let missing = dir.path().join("nope.pem");
    let err = read_certificates(&missing).unwrap_err().to_string();
    assert!(err.contains("nope.pem"), "{err}");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let err = read_certificates(&empty).unwrap_err().to_string();
    assert!(err.contains("no PEM certificate"), "{err}");
    // Certificate and key go together.
    assert!(ServerTls::from_parts(Some(server.cert.clone()), None, None).is_err());
    assert!(ServerTls::from_parts(None, None, Some(ca.cert.clone())).is_err());
    assert_eq!(ServerTls::from_parts(None, None, None).unwrap(), None);
}
