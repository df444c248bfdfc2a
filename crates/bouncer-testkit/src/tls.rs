//! A TLS client for tests: connects with a chosen SNI name, ALPN protocols and TLS versions,
//! tells which certificate and protocol the server chose, and sends requests over HTTP/1.1 or
//! HTTP/2 as negotiated.

use std::net::SocketAddr;
use std::sync::Arc;

use http::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme, SupportedProtocolVersion};
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpStream;

use crate::{Answer, BoxBody, read_whole};

/// How the client checks the server's certificate.
pub enum Trust<'a> {
    /// Verify the chain and the name against this CA (PEM).
    Ca(&'a str),
    /// Accept any certificate, to see which one a server sends for a name it does not cover.
    Anything,
}

pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
}

/// An established TLS connection and what was negotiated on it.
pub struct TlsConnection {
    /// The ALPN protocol the server chose.
    pub alpn: Option<Vec<u8>>,
    pub version: Option<rustls::ProtocolVersion>,
    /// The server's leaf certificate, DER.
    pub leaf: Vec<u8>,
    sender: Sender,
}

enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<BoxBody>),
    Http2(hyper::client::conn::http2::SendRequest<BoxBody>),
}

impl TlsClient {
    pub fn new(
        trust: Trust<'_>,
        alpn: &[&str],
        versions: &[&'static SupportedProtocolVersion],
    ) -> Self {
        Self::with_identity(trust, alpn, versions, None)
    }

    /// A client that presents `identity` (a certificate and its key) when the server asks.
    pub fn with_identity(
        trust: Trust<'_>,
        alpn: &[&str],
        versions: &[&'static SupportedProtocolVersion],
        identity: Option<&crate::TestCertificate>,
    ) -> Self {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(versions)
            .expect("protocol versions");
        let mut config = match trust {
            Trust::Ca(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    roots.add(cert.expect("CA PEM")).expect("a CA certificate");
                }
                let builder = builder.with_root_certificates(roots);
                match identity {
                    Some(identity) => {
                        let chain = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
                            .collect::<Result<Vec<_>, _>>()
                            .expect("the identity's certificate");
                        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(
                            identity.key_pem.as_bytes(),
                        )
                        .expect("the identity's key");
                        builder
                            .with_client_auth_cert(chain, key)
                            .expect("a client identity")
                    }
                    None => builder.with_no_client_auth(),
                }
            }
            Trust::Anything => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider)))
                .with_no_client_auth(),
        };
        config.alpn_protocols = alpn
            .iter()
            .map(|protocol| protocol.as_bytes().to_vec())
            .collect();
        TlsClient {
            config: Arc::new(config),
        }
    }

    /// A connector with this client's settings, for clients that run their own protocol on it.
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(Arc::clone(&self.config))
    }

    /// Connects to `address`, sending `server_name` as SNI (none for an IP address).
    pub async fn connect(
        &self,
        address: SocketAddr,
        server_name: &str,
    ) -> std::io::Result<TlsConnection> {
        let stream = TcpStream::connect(address).await?;
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&self.config));
        let stream = connector.connect(name, stream).await?;
        let (_, session) = stream.get_ref();
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        let version = session.protocol_version();
        let leaf = session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|cert| cert.as_ref().to_vec())
            .unwrap_or_default();
        let io = TokioIo::new(stream);
        let sender = if alpn.as_deref() == Some(b"h2") {
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(std::io::Error::other)?;
            tokio::spawn(connection);
            Sender::Http2(sender)
        } else {
            let (sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(connection);
            Sender::Http1(sender)
        };
        Ok(TlsConnection {
            alpn,
            version,
            leaf,
            sender,
        })
    }
}

impl TlsConnection {
    /// Sends `request` (origin-form target, `Host` header) over HTTP/1.1 and reads the answer
    /// whole; `None` when the exchange failed (for example after a refused client certificate).
    pub async fn send(&mut self, request: Request<BoxBody>) -> Option<Answer> {
        let Sender::Http1(sender) = &mut self.sender else {
            panic!("send is for HTTP/1.1 connections");
        };
        let response = sender.send_request(request).await.ok()?;
        Some(read_whole(response).await)
    }

    /// `GET path` with `Host: host` (`:authority` on HTTP/2), read whole.
    pub async fn get(&mut self, host: &str, path: &str) -> Answer {
        read_whole(self.start_get(host, path).await).await
    }

    /// `GET path`, returning as soon as the response headers arrived; the body is read by the
    /// caller.
    pub async fn start_get(
        &mut self,
        host: &str,
        path: &str,
    ) -> http::Response<hyper::body::Incoming> {
        let response = match &mut self.sender {
            Sender::Http1(sender) => {
                let request = Request::get(path)
                    .header(http::header::HOST, host)
                    .body(crate::empty())
                    .expect("request");
                sender.send_request(request).await
            }
            Sender::Http2(sender) => {
                let request = Request::get(format!("https://{host}{path}"))
                    .version(http::Version::HTTP_2)
                    .body(crate::empty())
                    .expect("request");
                sender.send_request(request).await
            }
        };
        response.expect("a response over TLS")
    }
}

/// The DER of the first certificate in `pem`.
pub fn leaf_der(pem: &str) -> Vec<u8> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("PEM")
        .as_ref()
        .to_vec()
}

#[derive(Debug)]
struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
