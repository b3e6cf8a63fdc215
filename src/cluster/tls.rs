//! Mutual TLS on node links (optional: `BRANCHD_CLUSTER_TLS_CERT`, `_KEY`,
//! `_CA`).
//!
//! With it, every node link is TLS 1.2/1.3 and both ends present a
//! certificate that must chain to the cluster's CA; the cookie is still
//! checked after the handshake, as a second factor. A node's identity in
//! the cluster is "holds a certificate of the cluster CA": the name in the
//! certificate is not compared with the address dialled, since nodes dial
//! each other by the addresses in the `nodes` table (pod IPs on
//! Kubernetes, which change with every pod).
//!
//! Why this module runs its own listener instead of ractor_cluster's TLS
//! mode: ractor_cluster's listener performs each TLS handshake inline, one
//! at a time, so a peer that opens a connection and never finishes its
//! handshake would stall every later connection. Here each handshake runs
//! in a task of its own, bounded by [`HANDSHAKE_TIMEOUT`], and only a
//! finished, verified stream is handed to the node server (as an external
//! transport). A refused connection is logged once, with its address, and
//! changes nothing else. The node server's own listener then only listens
//! on a loopback port, with TLS required there as well.
//!
//! This module never decides who is in the cluster (membership does); it
//! only makes sure that whoever connects holds a certificate of the CA.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ractor::ActorRef;
use ractor_cluster::{BoxRead, BoxWrite, ClusterBidiStream, NodeServerMessage};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::aws_lc_rs;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{
    self, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

use crate::shutdown::Shutdown;

/// How long a peer has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The name a dialling node asks for (SNI); certificates are checked
/// against the CA, not against this name.
const SERVER_NAME: &str = "branchd-node";

/// This node's TLS settings for node links, loaded once at start.
#[derive(Clone)]
pub struct ClusterTls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

impl ClusterTls {
    /// Reads the certificate chain, the key and the CA (PEM files) and
    /// builds both ends. Says which file is wrong, and how, when one is.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> anyhow::Result<ClusterTls> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<_, _>>())
            .with_context(|| {
                format!(
                    "reading the certificate chain {} (BRANCHD_CLUSTER_TLS_CERT)",
                    cert.display()
                )
            })?;
        anyhow::ensure!(
            !chain.is_empty(),
            "{} (BRANCHD_CLUSTER_TLS_CERT) holds no PEM certificate",
            cert.display()
        );
        let key = PrivateKeyDer::from_pem_file(key).with_context(|| {
            format!(
                "reading the private key {} (BRANCHD_CLUSTER_TLS_KEY)",
                key.display()
            )
        })?;
        let mut roots = RootCertStore::empty();
        let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .and_then(|certs| certs.collect::<Result<_, _>>())
            .with_context(|| format!("reading the CA {} (BRANCHD_CLUSTER_TLS_CA)", ca.display()))?;
        for authority in cas {
            roots.add(authority).with_context(|| {
                format!(
                    "{} (BRANCHD_CLUSTER_TLS_CA) holds a certificate that is not a usable CA",
                    ca.display()
                )
            })?;
        }
        anyhow::ensure!(
            !roots.is_empty(),
            "{} (BRANCHD_CLUSTER_TLS_CA) holds no PEM certificate",
            ca.display()
        );
        let roots = Arc::new(roots);
        let provider = Arc::new(aws_lc_rs::default_provider());

        let clients = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .context("building the verifier of peers' certificates")?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("choosing TLS versions")?
            .with_client_cert_verifier(clients)
            .with_single_cert(chain.clone(), key.clone_key())
            .context("the certificate (BRANCHD_CLUSTER_TLS_CERT) does not match the key (BRANCHD_CLUSTER_TLS_KEY)")?;
        let servers = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .context("building the verifier of peers' certificates")?;
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("choosing TLS versions")?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(CaOnly { inner: servers }))
            .with_client_auth_cert(chain, key)
            .context("the certificate (BRANCHD_CLUSTER_TLS_CERT) does not match the key (BRANCHD_CLUSTER_TLS_KEY)")?;
        Ok(ClusterTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }

    /// The acceptor, for the node server's own (loopback) listener.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// Dials a peer: TCP, then the TLS handshake (both in the caller's
    /// task), then the stream goes to the node server, which authenticates
    /// the cookie as on any link.
    pub async fn dial(
        &self,
        server: &ActorRef<NodeServerMessage>,
        addr: &str,
    ) -> anyhow::Result<()> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(SERVER_NAME)?;
        let stream = self
            .connector
            .connect(name, tcp)
            .await
            .context("TLS handshake")?;
        ractor_cluster::client_connect_external(
            server,
            Box::new(Link {
                stream: tokio_rustls::TlsStream::Client(stream),
                peer: addr.to_string(),
            }),
        )
        .await?;
        Ok(())
    }

    /// Accepts node links on `bind` until `stop`: each handshake in a task
    /// of its own, at most [`HANDSHAKE_TIMEOUT`]; verified streams go to
    /// the node server.
    pub async fn listen(
        &self,
        listener: TcpListener,
        server: ActorRef<NodeServerMessage>,
        tasks: Shutdown,
        stop: CancellationToken,
    ) {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors, say: wait a little rather than spin.
                    tracing::warn!(error = %err, "accepting a cluster connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (acceptor, server) = (self.acceptor.clone(), server.clone());
            tasks.spawn(async move { accept(acceptor, server, tcp, peer).await });
        }
    }
}

async fn accept(
    acceptor: TlsAcceptor,
    server: ActorRef<NodeServerMessage>,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let _ = tcp.set_nodelay(true);
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            tracing::warn!(%peer, error = %err, "refused a cluster connection: TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, timeout_ms = HANDSHAKE_TIMEOUT.as_millis() as u64, "refused a cluster connection: no TLS handshake in time");
            return;
        }
    };
    let link = Link {
        stream: tokio_rustls::TlsStream::Server(stream),
        peer: peer.to_string(),
    };
    let _ = server.cast(NodeServerMessage::ConnectionOpenedExternal {
        stream: Box::new(link),
        is_server: true,
    });
}

/// A verified TLS stream, as the node server takes external transports.
struct Link {
    stream: tokio_rustls::TlsStream<TcpStream>,
    peer: String,
}

impl ClusterBidiStream for Link {
    fn split(self: Box<Self>) -> (BoxRead, BoxWrite) {
        let (read, write) = tokio::io::split(self.stream);
        (Box::new(read), Box::new(write))
    }

    fn peer_label(&self) -> Option<String> {
        Some(self.peer.clone())
    }
}

/// Checks a server's certificate chain against the cluster CA and nothing
/// else: any name is accepted (see the module's doc for why).
#[derive(Debug)]
struct CaOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for CaOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
