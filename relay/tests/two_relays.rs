//! Two relays in one process keep apart: each owns its metrics, events and rules, so mail accepted by one
//! is counted by that one only. This guards against state creeping back into process-wide statics.

use std::net::SocketAddr;

use herald_config::Config;
use herald_relay::app::Relay;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn config(spool: &std::path::Path) -> Config {
    // Delivery goes to a closed loopback port: accepted mail is deferred, never sent anywhere. The relays
    // have no sending domains, so their listener takes any sender.
    Config::parse(&format!(
        r#"
hostname: relay.test
spool_dir: {}
listeners:
  - {{ name: trusted, address: "127.0.0.1:0", allow_networks: [127.0.0.0/8], trusted_senders: any }}
delivery:
  smarthost: {{ host: 127.0.0.1, port: 9, tls: none }}
"#,
        spool.display()
    ))
    .expect("test config is valid")
}

/// Sends one message and returns the final reply line to the end of DATA.
async fn send(address: SocketAddr) -> String {
    let stream = TcpStream::connect(address).await.expect("connect");
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut last = String::new();
    let expect = async |lines: &mut tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>| {
        loop {
            let line = lines.next_line().await.expect("read").expect("open");
            if line.as_bytes().get(3) != Some(&b'-') {
                return line;
            }
        }
    };
    expect(&mut lines).await;
    for cmd in [
        "EHLO client.test\r\n",
        "MAIL FROM:<app@example.test>\r\n",
        "RCPT TO:<someone@example.net>\r\n",
        "DATA\r\n",
        "Subject: hi\r\n\r\nhello\r\n.\r\n",
    ] {
        write.write_all(cmd.as_bytes()).await.expect("write");
        last = expect(&mut lines).await;
    }
    write.write_all(b"QUIT\r\n").await.expect("write");
    last
}

fn received(relay: &Relay) -> String {
    relay
        .metrics()
        .render()
        .lines()
        .find(|l| l.starts_with("herald_messages_received_total{listener=\"trusted\"}"))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_in_one_process_count_apart() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Relay::start(config(dir_a.path()), None)
        .await
        .expect("relay a");
    let b = Relay::start(config(dir_b.path()), None)
        .await
        .expect("relay b");
    let reply = send(a.listener_address("trusted").expect("a listens")).await;
    assert!(reply.starts_with("250 "), "{reply}");
    assert_eq!(
        received(&a),
        "herald_messages_received_total{listener=\"trusted\"} 1"
    );
    assert_eq!(
        received(&b),
        "herald_messages_received_total{listener=\"trusted\"} 0"
    );
    a.shutdown().await;
    b.shutdown().await;
}
