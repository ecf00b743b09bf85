//! Mutual TLS on the gRPC listener, with certificates made for the test (rcgen): a client with
//! a certificate from the configured CA gets in; one without a certificate, or with one from
//! another CA, never reaches a handler.

use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tally::pb;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::support::{Backend, TestApp};

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let pem = params.self_signed(&key).unwrap().pem();
    Ca {
        pem,
        issuer: Issuer::new(params, key),
    }
}

/// (certificate PEM, key PEM) for `names`, signed by `ca`.
fn leaf(ca: &Ca, names: &[&str]) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

async fn connect(app: &TestApp, ca: &Ca, identity: Option<&(String, String)>) -> Option<Channel> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://localhost:{}", app.addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .ok()?;
    // With TLS 1.3 a refused client certificate may surface on the first call, not the connect.
    let mut credit = pb::credit_service_client::CreditServiceClient::new(channel.clone());
    credit
        .check_balance(pb::CheckBalanceRequest {
            account_id: "nobody".into(),
        })
        .await
        .map_or_else(|s| s.code() == tonic::Code::NotFound, |_| true)
        .then_some(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_admits_only_clients_of_the_configured_ca() {
    let server_ca = ca("tally test server CA");
    let client_ca = ca("tally test client CA");
    let rogue_ca = ca("someone else");
    let (cert, key) = leaf(&server_ca, &["localhost"]);
    let good = leaf(&client_ca, &["video-gen"]);
    let rogue = leaf(&rogue_ca, &["video-gen"]);
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        s.tls = Some(tally::app::TlsFiles {
            cert: cert.into_bytes(),
            key: key.into_bytes(),
            client_ca: Some(client_ca.pem.clone().into_bytes()),
        });
    })
    .await;
    assert!(
        connect(&app, &server_ca, Some(&good)).await.is_some(),
        "a client certificate from the configured CA works"
    );
    assert!(
        connect(&app, &server_ca, None).await.is_none(),
        "no client certificate: refused"
    );
    assert!(
        connect(&app, &server_ca, Some(&rogue)).await.is_none(),
        "a certificate from another CA: refused"
    );
    // Plaintext to a TLS port fails too.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{}", app.addr.port()))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain {
        let r = pb::credit_service_client::CreditServiceClient::new(ch)
            .check_balance(pb::CheckBalanceRequest {
                account_id: "a".into(),
            })
            .await;
        assert!(r.is_err());
    }
    app.finish().await;
}
