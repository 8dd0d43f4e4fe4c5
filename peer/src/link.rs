//! The authenticated peer link: TCP + TLS 1.3 (rustls), then each side proves it holds the
//! shared secret with HMAC-SHA256 over the TLS exporter value and its node name. The exporter
//! is unique to the TLS session, so a proof recorded from one session is worthless in another,
//! and a man in the middle (two TLS sessions) cannot forward one. Certificates are therefore not
//! what authenticates the peer; any certificate is accepted, its handshake signature checked.
//! There is no plaintext mode.

use crate::proto::{Channel, Frame, Role, FRAME_BYTES_MAX, VERSION};
use bytes::{Bytes, BytesMut};
use hmac::{Hmac, Mac};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::Sha256;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const EXPORTER_LABEL: &[u8] = b"EXPORTER-spoolpair-link";
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a link could not be set up or broke.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// Socket or TLS error.
    #[error("link I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The peer's proof did not verify: wrong shared secret, or a replayed proof.
    #[error("peer {node:?} failed authentication (wrong shared secret or replayed proof)")]
    AuthFailed {
        /// The name the peer claimed.
        node: String,
    },
    /// The peer speaks something else.
    #[error("link protocol: {0}")]
    Protocol(String),
    /// Handshake took too long.
    #[error("link handshake timed out")]
    Timeout,
    /// The other side ended the session between frames (a request session ends so when the
    /// asker has its answers).
    #[error("link closed")]
    Closed,
}

/// This node's side of the link.
#[derive(Clone)]
pub struct LinkConfig {
    /// Our node name.
    pub node: String,
    /// The shared secret.
    pub secret: Arc<Vec<u8>>,
    /// Our split-brain priority.
    pub priority: u32,
    /// Our TLS identity (server side).
    pub server: Arc<rustls::ServerConfig>,
    /// Our TLS client settings.
    pub client: Arc<rustls::ClientConfig>,
}

impl LinkConfig {
    /// Builds the TLS settings from a PEM certificate chain and key.
    pub fn new(
        node: String,
        secret: Vec<u8>,
        priority: u32,
        certs: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<LinkConfig, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        let client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        Ok(LinkConfig {
            node,
            secret: Arc::new(secret),
            priority,
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// What the peer said about itself.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// Its node name.
    pub node: String,
    /// Its role at connect time.
    pub role: Role,
    /// Its priority.
    pub priority: u32,
    /// What the connection is for.
    pub channel: Channel,
}

/// Byte stream of an established link.
pub trait LinkIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> LinkIo for T {}

/// An authenticated link.
pub struct Link {
    /// The stream.
    pub io: Box<dyn LinkIo>,
    /// The peer.
    pub peer: PeerInfo,
}

/// HMAC-SHA256 keyed with the secret over the side, node name and TLS exporter value.
fn mac(secret: &[u8], side: &str, node: &str, exporter: &[u8; 32]) -> Option<Hmac<Sha256>> {
    // HMAC takes keys of any length, so this is always Some.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).ok()?;
    for part in [
        b"spoolpair-link-1".as_slice(),
        side.as_bytes(),
        node.as_bytes(),
    ] {
        mac.update(part);
        mac.update(b"\0");
    }
    mac.update(exporter);
    Some(mac)
}

fn proof(secret: &[u8], side: &str, node: &str, exporter: &[u8; 32]) -> [u8; 32] {
    mac(secret, side, node, exporter)
        .map(|m| m.finalize().into_bytes().into())
        .unwrap_or([0; 32])
}

fn verify(secret: &[u8], side: &str, node: &str, exporter: &[u8; 32], got: &[u8; 32]) -> bool {
    // verify_slice compares in constant time.
    mac(secret, side, node, exporter).is_some_and(|m| m.verify_slice(got).is_ok())
}

/// Reads one frame.
pub async fn read_frame<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> Result<Frame, LinkError> {
    let len = r.read_u32().await? as usize;
    if len == 0 || len > FRAME_BYTES_MAX {
        return Err(LinkError::Protocol(format!("frame length {len}")));
    }
    let mut buf = BytesMut::zeroed(len);
    r.read_exact(&mut buf).await?;
    Frame::decode(buf.freeze()).map_err(|e| LinkError::Protocol(e.to_string()))
}

/// Writes one frame; an `Add`'s body goes from `body` without being copied into the frame.
pub async fn write_frame<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    f: &Frame,
    body: &[u8],
) -> Result<(), LinkError> {
    let head = f.encode_head(body.len());
    w.write_all(&head).await?;
    if !body.is_empty() {
        w.write_all(body).await?;
    }
    Ok(())
}

/// Frames queued for one vectored write: their heads, and `Add` bodies still in the buffers
/// they were received into or in their memory maps. A window's worth of frames then leaves in a few TLS records and system calls
/// instead of two of each per frame (measured per frame before: a record and a `sendto` for
/// the head, the same for the body), and no body is copied before TLS encrypts it.
#[derive(Default)]
pub struct FrameBatch {
    pieces: std::collections::VecDeque<Piece>,
    /// Bytes of the front piece already written.
    offset: usize,
    remaining: usize,
}

/// The body that follows a frame's head in a [`FrameBatch`].
pub enum BodyPieces {
    /// No body (anything but an `Add`).
    None,
    /// The buffers SMTP received the body into, in order.
    Received(Vec<Bytes>),
    /// The `.body` file, memory-mapped.
    Mapped(Box<dyn AsRef<[u8]> + Send + Sync>),
}

enum Piece {
    Head(BytesMut),
    Received(Bytes),
    Mapped(Box<dyn AsRef<[u8]> + Send + Sync>),
}

impl Piece {
    fn bytes(&self) -> &[u8] {
        match self {
            Piece::Head(h) => h,
            Piece::Received(b) => b,
            Piece::Mapped(b) => b.as_ref().as_ref(),
        }
    }
}

impl FrameBatch {
    /// Queues `f`, followed by `body` (an `Add`'s).
    pub fn push(&mut self, f: &Frame, body: BodyPieces) {
        let body_pieces = match body {
            BodyPieces::None => Vec::new(),
            BodyPieces::Received(chunks) => chunks.into_iter().map(Piece::Received).collect(),
            BodyPieces::Mapped(body) => vec![Piece::Mapped(body)],
        };
        let body_len: usize = body_pieces.iter().map(|p| p.bytes().len()).sum();
        let head = f.encode_head(body_len);
        self.remaining += head.len() + body_len;
        self.pieces.push_back(Piece::Head(head));
        self.pieces
            .extend(body_pieces.into_iter().filter(|p| !p.bytes().is_empty()));
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.remaining == 0
    }

    /// Writes every queued frame (the caller flushes).
    pub async fn write_to<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> Result<(), LinkError> {
        w.write_all_buf(self).await?;
        Ok(())
    }
}

impl bytes::Buf for FrameBatch {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.pieces
            .front()
            .map_or(&[], |p| &p.bytes()[self.offset..])
    }

    fn advance(&mut self, mut n: usize) {
        assert!(n <= self.remaining, "advance past the end of a FrameBatch");
        self.remaining -= n;
        while n > 0 {
            let Some(front) = self.pieces.front() else {
                break;
            };
            let left = front.bytes().len() - self.offset;
            if n < left {
                self.offset += n;
                return;
            }
            n -= left;
            self.offset = 0;
            self.pieces.pop_front();
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [std::io::IoSlice<'a>]) -> usize {
        let mut filled = 0;
        for (i, piece) in self.pieces.iter().enumerate() {
            let Some(slot) = dst.get_mut(filled) else {
                break;
            };
            let from = if i == 0 { self.offset } else { 0 };
            *slot = std::io::IoSlice::new(&piece.bytes()[from..]);
            filled += 1;
        }
        filled
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    cfg: &LinkConfig,
    role: Role,
    channel: Channel,
    exporter: [u8; 32],
    our_side: &str,
    their_side: &str,
) -> Result<PeerInfo, LinkError> {
    let hello = Frame::Hello {
        version: VERSION,
        role,
        priority: cfg.priority,
        channel,
        node: cfg.node.clone(),
    };
    write_frame(s, &hello, &[]).await?;
    write_frame(
        s,
        &Frame::Proof(proof(&cfg.secret, our_side, &cfg.node, &exporter)),
        &[],
    )
    .await?;
    s.flush().await?;
    let peer = match read_frame(s).await? {
        Frame::Hello {
            version,
            role,
            priority,
            channel,
            node,
        } => {
            if version != VERSION {
                return Err(LinkError::Protocol(format!(
                    "peer speaks version {version}, we speak {VERSION}"
                )));
            }
            PeerInfo {
                node,
                role,
                priority,
                channel,
            }
        }
        other => {
            return Err(LinkError::Protocol(format!(
                "expected Hello, got {other:?}"
            )))
        }
    };
    match read_frame(s).await? {
        Frame::Proof(mac) if verify(&cfg.secret, their_side, &peer.node, &exporter, &mac) => {
            Ok(peer)
        }
        Frame::Proof(_) => Err(LinkError::AuthFailed { node: peer.node }),
        other => Err(LinkError::Protocol(format!(
            "expected Proof, got {other:?}"
        ))),
    }
}

/// Connects to the partner and authenticates both ways.
pub async fn connect(
    addr: SocketAddr,
    cfg: &LinkConfig,
    role: Role,
    channel: Channel,
) -> Result<Link, LinkError> {
    let go = async {
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        let connector = tokio_rustls::TlsConnector::from(cfg.client.clone());
        let name = ServerName::try_from("spoolpair-peer")
            .map_err(|e| LinkError::Protocol(e.to_string()))?;
        let mut tls = connector.connect(name, tcp).await?;
        let exporter = exporter_of(tls.get_ref().1)?;
        let peer = exchange(&mut tls, cfg, role, channel, exporter, "client", "server").await?;
        Ok(Link {
            io: Box::new(tls),
            peer,
        })
    };
    within_handshake_time(go).await
}

/// Accepts a partner's connection and authenticates both ways.
pub async fn accept(tcp: TcpStream, cfg: &LinkConfig, role: Role) -> Result<Link, LinkError> {
    let go = async {
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg.server.clone());
        let mut tls = acceptor.accept(tcp).await?;
        let exporter = exporter_of(tls.get_ref().1)?;
        // Both sides write their Hello before reading the other's: the accepting side's names
        // no channel of its own (it carries the default, and the connecting side ignores it).
        let peer = exchange(
            &mut tls,
            cfg,
            role,
            Channel::Replication,
            exporter,
            "server",
            "client",
        )
        .await?;
        Ok(Link {
            io: Box::new(tls),
            peer,
        })
    };
    within_handshake_time(go).await
}

/// The TLS session's exporter value that both proofs are bound to.
fn exporter_of<D>(conn: &rustls::ConnectionCommon<D>) -> Result<[u8; 32], LinkError> {
    let mut exporter = [0u8; 32];
    conn.export_keying_material(&mut exporter, EXPORTER_LABEL, None)
        .map_err(|e| LinkError::Protocol(e.to_string()))?;
    Ok(exporter)
}

async fn within_handshake_time(
    handshake: impl std::future::Future<Output = Result<Link, LinkError>>,
) -> Result<Link, LinkError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| LinkError::Timeout)?
}

/// Accepts any certificate but checks the handshake's signatures; the HMAC over the exporter is
/// what authenticates the peer (see the module documentation).
#[derive(Debug)]
pub struct AnyCertificate(pub Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
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

/// Sends one request on a link and waits for its reply (heartbeats in between are skipped);
/// nothing else may be in flight. The inner error is the peer's refusal.
pub async fn request(
    frames: &mut tokio::sync::mpsc::Receiver<Result<Frame, LinkError>>,
    w: &mut tokio::io::WriteHalf<Box<dyn LinkIo>>,
    op: u8,
    arg: &[u8],
) -> Result<Result<Bytes, String>, LinkError> {
    write_frame(
        w,
        &Frame::Request {
            op,
            arg: Bytes::copy_from_slice(arg),
        },
        &[],
    )
    .await?;
    w.flush().await?;
    loop {
        match frames.recv().await {
            Some(Ok(Frame::Reply { ok: true, data })) => return Ok(Ok(data)),
            Some(Ok(Frame::Reply { ok: false, data })) => {
                return Ok(Err(String::from_utf8_lossy(&data).into_owned()))
            }
            Some(Ok(Frame::Heartbeat { .. })) => continue,
            Some(Ok(other)) => return Err(LinkError::Protocol(format!("unexpected {other:?}"))),
            Some(Err(e)) => return Err(e),
            None => return Err(LinkError::Closed),
        }
    }
}

/// One request in a session of its own on `channel`: connected, asked, closed cleanly (a TLS
/// close, so the peer sees a hang-up, not a broken link).
pub async fn ask(
    addr: SocketAddr,
    cfg: &LinkConfig,
    channel: Channel,
    op: u8,
    arg: &[u8],
) -> Result<Result<Bytes, String>, LinkError> {
    let link = connect(addr, cfg, Role::Active, channel).await?;
    let (r, mut w) = tokio::io::split(link.io);
    let mut frames = spawn_reader(r);
    let answer = request(&mut frames, &mut w, op, arg).await;
    let _ = w.shutdown().await;
    answer
}

/// Accepts links on `listener` for ever and runs `session` for each one that authenticates and
/// declares `channel`, each in a task of its own; a link for another channel is closed, a
/// refused one logged (and, for a wrong secret, reported to `on_auth_failure`). `service`
/// names the listener in the log.
pub async fn serve<S, F>(
    listener: tokio::net::TcpListener,
    cfg: LinkConfig,
    channel: Channel,
    service: &'static str,
    on_auth_failure: impl Fn() + Send + Sync + 'static,
    session: S,
) where
    S: Fn(Link) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = Result<(), LinkError>> + Send + 'static,
{
    let on_auth_failure = Arc::new(on_auth_failure);
    let session = Arc::new(session);
    loop {
        let Ok((tcp, from)) = listener.accept().await else {
            // EMFILE and friends: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (cfg, on_auth_failure, session) =
            (cfg.clone(), on_auth_failure.clone(), session.clone());
        tokio::spawn(async move {
            match accept(tcp, &cfg, Role::Active).await {
                Ok(l) if l.peer.channel != channel => {
                    tracing::warn!(%from, channel = ?l.peer.channel, "{service} listener: link for another channel closed");
                }
                Ok(l) => {
                    let node = l.peer.node.clone();
                    if let Err(e) = session(l).await {
                        tracing::warn!(%from, %node, "{service}: {e}");
                    }
                }
                Err(e) => {
                    if matches!(e, LinkError::AuthFailed { .. }) {
                        on_auth_failure();
                    }
                    tracing::warn!(%from, "{service} link refused: {e}");
                }
            }
        });
    }
}

/// Frames from a link's read half, for tasks that also write.
pub fn spawn_reader(
    mut r: tokio::io::ReadHalf<Box<dyn LinkIo>>,
) -> tokio::sync::mpsc::Receiver<Result<Frame, LinkError>> {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            let f = read_frame(&mut r).await;
            let end = f.is_err();
            if tx.send(f).await.is_err() || end {
                return;
            }
        }
    });
    rx
}

impl LinkConfig {
    /// A link identity with a fresh self-signed certificate. The shared secret is what
    /// authenticates (the module doc), so a link needs no certificate of its own; the
    /// handshake signature is still checked.
    pub fn self_signed(node: &str, secret: &[u8], priority: u32) -> Result<LinkConfig, LinkError> {
        let cert = rcgen::generate_simple_self_signed(vec!["spoolpair-peer".into()])
            .map_err(|e| LinkError::Protocol(format!("make a certificate: {e}")))?;
        let key = PrivateKeyDer::try_from(cert.key_pair.serialize_der())
            .map_err(|e| LinkError::Protocol(format!("certificate key: {e}")))?;
        LinkConfig::new(
            node.into(),
            secret.to_vec(),
            priority,
            vec![cert.cert.der().clone()],
            key,
        )
        .map_err(|e| LinkError::Protocol(format!("TLS settings: {e}")))
    }
}

/// A link identity for this crate's tests.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn test_config(node: &str, secret: &[u8]) -> LinkConfig {
    LinkConfig::self_signed(node, secret, 1).unwrap()
}

#[cfg(test)]
mod tests {
    use super::test_config as config;
    use super::*;
    use bytes::Bytes;

    /// Takes at most 7 bytes per write, vectored or not, like a congested socket.
    struct Trickle(Vec<u8>);

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = buf.len().min(7);
            self.0.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(7 - n);
                self.0.extend_from_slice(&b[..take]);
                n += take;
                if n == 7 {
                    break;
                }
            }
            std::task::Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_frame_batch_written_in_pieces_reads_back_frame_for_frame() {
        // A body the writer takes by reference (a memory-mapped `.body` in the daemon).
        let mapped = |_name: &str, bytes: &[u8]| bytes.to_vec();
        let add = |seq, env: &'static [u8]| Frame::Add {
            seq,
            id: format!("id{seq}"),
            held: false,
            env: Bytes::from_static(env),
            body: Bytes::new(),
        };
        let mut batch = FrameBatch::default();
        let mapped = |name, bytes: &[u8]| BodyPieces::Mapped(Box::new(mapped(name, bytes)));
        batch.push(&add(1, b"env one\n"), mapped("1", b"body one\r\n"));
        batch.push(
            &Frame::Delete {
                seq: 2,
                id: "id2".into(),
            },
            BodyPieces::None,
        );
        batch.push(&add(3, b"env three\n"), mapped("3", b""));
        batch.push(&add(4, b""), mapped("4", &[b'x'; 5000]));
        let received = [&b"Received: x\r\n"[..], b"", b"body five\r\n"].map(Bytes::from_static);
        batch.push(
            &add(5, b"env five\n"),
            BodyPieces::Received(received.to_vec()),
        );
        let mut out = Trickle(Vec::new());
        batch.write_to(&mut out).await.unwrap();
        assert!(batch.is_empty());

        let mut wire = &out.0[..];
        let mut read = Vec::new();
        while !wire.is_empty() {
            read.push(read_frame(&mut wire).await.unwrap());
        }
        let with_body = |f: Frame, body: &[u8]| match f {
            Frame::Add {
                seq, id, held, env, ..
            } => Frame::Add {
                seq,
                id,
                held,
                env,
                body: Bytes::copy_from_slice(body),
            },
            other => other,
        };
        assert_eq!(
            read,
            vec![
                with_body(add(1, b"env one\n"), b"body one\r\n"),
                Frame::Delete {
                    seq: 2,
                    id: "id2".into()
                },
                add(3, b"env three\n"),
                with_body(add(4, b""), &[b'x'; 5000]),
                with_body(add(5, b"env five\n"), b"Received: x\r\nbody five\r\n"),
            ]
        );
    }

    async fn pair(
        a: LinkConfig,
        b: LinkConfig,
    ) -> (Result<Link, LinkError>, Result<Link, LinkError>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            accept(tcp, &b, Role::Passive).await
        });
        let client = connect(addr, &a, Role::Active, Channel::PartnerRequests).await;
        (client, server.await.unwrap())
    }

    #[tokio::test]
    async fn same_secret_authenticates_both_ways() {
        let (c, s) = pair(config("gw_a", b"s3cret"), config("gw_b", b"s3cret")).await;
        let (c, s) = (c.unwrap(), s.unwrap());
        assert_eq!(c.peer.node, "gw_b");
        assert_eq!(s.peer.node, "gw_a");
        assert_eq!(s.peer.role, Role::Active);
        assert_eq!(
            s.peer.channel,
            Channel::PartnerRequests,
            "the connecting side's channel"
        );
    }

    #[tokio::test]
    async fn wrong_secret_is_refused_on_both_sides() {
        let (c, s) = pair(config("gw_a", b"s3cret"), config("gw_b", b"other")).await;
        assert!(
            matches!(c, Err(LinkError::AuthFailed { .. })),
            "{:?}",
            c.err()
        );
        assert!(s.is_err());
    }

    #[test]
    fn a_proof_is_bound_to_its_session() {
        let e1 = [1u8; 32];
        let e2 = [2u8; 32];
        let p = proof(b"k", "client", "gw_a", &e1);
        assert!(verify(b"k", "client", "gw_a", &e1, &p));
        assert!(
            !verify(b"k", "client", "gw_a", &e2, &p),
            "replayed into another session"
        );
        assert!(
            !verify(b"k", "server", "gw_a", &e1, &p),
            "reflected to the other side"
        );
        assert!(
            !verify(b"k", "client", "gw_b", &e1, &p),
            "claimed by another node"
        );
    }
}
