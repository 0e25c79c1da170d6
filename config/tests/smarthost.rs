//! `delivery.smarthost`: credentials only with TLS, a CA file only where there is a certificate to verify,
//! and a host that can be checked against a certificate; each refusal names its field.

use herald_config::Config;

fn with_smarthost(smarthost: &str) -> Result<Config, String> {
    Config::parse(&format!(
        "hostname: a\nspool_dir: s\nlisteners:\n - {{name: x, address: 127.0.0.1:1}}\ndelivery:\n  smarthost: {smarthost}\n"
    ))
    .map_err(|e| e.to_string())
}

#[test]
fn credentials_with_tls_none_are_refused_naming_tls() {
    let e = with_smarthost("{host: relay, tls: none, username: u, password_file: /p}").unwrap_err();
    assert!(e.starts_with("delivery.smarthost.tls: "), "{e}");
    assert!(e.contains("never in clear"), "{e}");
    // tls: none is the default, so leaving tls out is the same mistake.
    let e = with_smarthost("{host: relay, username: u, password_file: /p}").unwrap_err();
    assert!(e.starts_with("delivery.smarthost.tls: "), "{e}");
}

#[test]
fn a_password_file_without_a_username_is_refused() {
    let e = with_smarthost("{host: relay, tls: starttls, password_file: /p}").unwrap_err();
    assert!(e.starts_with("delivery.smarthost: "), "{e}");
}

#[test]
fn credentials_over_starttls_or_implicit_tls_with_a_ca_file_are_accepted() {
    for mode in ["starttls", "implicit"] {
        let c = with_smarthost(&format!(
            "{{host: relay.mail.svc, tls: {mode}, username: u, password_file: /p, ca_file: /ca.crt}}"
        ))
        .unwrap();
        let sh = c.delivery.smarthost.unwrap();
        assert_eq!(sh.ca_file.as_deref(), Some(std::path::Path::new("/ca.crt")));
    }
}

#[test]
fn a_ca_file_with_tls_none_is_refused_naming_ca_file() {
    let e = with_smarthost("{host: relay, tls: none, ca_file: /ca.crt}").unwrap_err();
    assert!(e.starts_with("delivery.smarthost.ca_file: "), "{e}");
    let e = with_smarthost("{host: relay, tls: starttls, ca_file: ''}").unwrap_err();
    assert!(e.starts_with("delivery.smarthost.ca_file: "), "{e}");
}

#[test]
fn the_host_must_be_a_name_or_address_a_certificate_can_be_checked_against() {
    for bad in ["''", "'relay host'", "relay_1", "'[127.0.0.1]'"] {
        let e = with_smarthost(&format!("{{host: {bad}, tls: starttls}}")).unwrap_err();
        assert!(e.starts_with("delivery.smarthost.host: "), "{bad}: {e}");
    }
    for good in ["relay", "smtp.example.com", "127.0.0.1", "'::1'"] {
        with_smarthost(&format!("{{host: {good}, tls: starttls}}"))
            .unwrap_or_else(|e| panic!("{good}: {e}"));
    }
}
