//! A server-side TLS stream over rustls' unbuffered API, which holds no buffer while idle.
//!
//! `tokio-rustls` keeps a rustls `ServerConnection`, whose record reader keeps a buffer of
//! at least 4 KiB for the connection's whole life (it is sized before every socket read,
//! and shrinks back to 4 KiB, not to nothing). With 5,000 idle `wss://` connections that
//! buffer was about half of the TLS connection's cost. Here the connection keeps three
//! buffers that are empty (unallocated) between records:
//!
//! - `incoming`: ciphertext read but not yet processed, that is the start of a record whose
//!   rest has not arrived. A read goes to a per-thread scratch buffer first; only what is
//!   left of it once every complete record is processed is copied here.
//! - `plaintext`: decrypted bytes the reader has not taken yet (a record larger than the
//!   caller's buffer).
//! - `outgoing`: ciphertext not yet written to the socket: records written but not yet
//!   flushed, or what the socket's buffer did not take.
//!
//! The stream is one [`TlsStream`] type, cheap to clone: the connection's reader task and
//! its writer each own a clone (see `conn::socket::serve_upgraded`), as they own the halves
//! of a plain TCP connection. The rustls state is behind a mutex that no call holds across
//! an `.await`. The reader polls the socket's read readiness and the writer its write
//! readiness, so each task keeps its own waker. Whoever holds the lock runs rustls, and the
//! bytes rustls wants sent (handshake records, the answer to a TLS 1.3 `KeyUpdate`, an
//! alert) join `outgoing` in order: the reader tries to send them at once without waiting,
//! and what the socket did not take goes with the writer's next write.
//!
//! Behaviour matches `tokio-rustls`: the handshake completes before [`accept`] returns
//! (bounded by the caller's timeout; TLS 1.3's session tickets go out with the first
//! write), EOF without `close_notify` reads as `UnexpectedEof`, a TLS error as
//! `InvalidData` (after its alert is sent, best effort), and shutdown sends `close_notify`
//! and then the TCP FIN.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// One socket read: a whole record at most (16 KiB of plaintext, and TLS 1.2's largest
/// expansion).
const READ_CHUNK: usize = 5 + 16_384 + 2_048;

/// Most plaintext encrypted by one write: one full record.
const WRITE_CHUNK: usize = 16_384;

/// Ciphertext that writes may gather before one is sent without waiting for the flush.
const SEND_AT: usize = 4 * WRITE_CHUNK;

/// Room for a record's header, nonce, content type and tag, which is at most 29 bytes with
/// the ring provider's suites (TLS 1.2 AES-GCM).
const RECORD_OVERHEAD: usize = 64;

/// The most ciphertext kept for a record still arriving, or a handshake message spread over
/// records (rustls refuses handshake messages over 64 KiB).
const MAX_INCOMING: usize = 0x1_0000 + READ_CHUNK;

thread_local! {
    /// Where socket reads land first; zeroed once per thread, not once per read.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_CHUNK]);
    /// Where a vectored write's small frames are gathered into one record.
    static GATHER: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(WRITE_CHUNK));
}

/// A TLS connection over a TCP socket. Every clone is the same connection.
#[derive(Clone)]
pub struct TlsStream(Arc<Shared>);

struct Shared {
    tcp: TcpStream,
    tls: Mutex<Tls>,
}

struct Tls {
    conn: UnbufferedServerConnection,
    incoming: Vec<u8>,
    plaintext: Vec<u8>,
    plaintext_taken: usize,
    outgoing: Vec<u8>,
    outgoing_sent: usize,
    /// `outgoing` holds only what the handshake left (TLS 1.3's session tickets): a flush
    /// does not send it, the next write takes it along.
    deferred: bool,
    /// The peer sent `close_notify`: reads see EOF once `plaintext` is drained.
    peer_closed: bool,
    /// The socket reached EOF.
    eof: bool,
    /// We queued `close_notify`: no more writes.
    write_closed: bool,
    /// A fatal TLS error: every later call fails with it.
    error: Option<rustls::Error>,
}

/// What the caller wants from one run of rustls over the input it has.
enum Job<'a> {
    /// Only process what came in.
    Process,
    /// Then encrypt these bytes of application data.
    Write(&'a [u8]),
    /// Then queue `close_notify`.
    Close,
}

/// Where one run of rustls stopped.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// The handshake needs more input.
    Handshaking,
    /// Application data may flow (the job, if any, is done).
    Traffic,
    /// Both sides sent `close_notify`.
    Closed,
}

/// Runs rustls over `input` until it needs more input or may carry application data, and
/// does `job` in the latter case. Decrypted data is appended to `plaintext`, records to send
/// to `outgoing`. Returns how many bytes of `input` were consumed: the caller removes them
/// from the front before the next call (what remains is the start of a record).
fn drive(
    conn: &mut UnbufferedServerConnection,
    input: &mut [u8],
    plaintext: &mut Vec<u8>,
    outgoing: &mut Vec<u8>,
    peer_closed: &mut bool,
    mut job: Job<'_>,
) -> (usize, Result<Stop, rustls::Error>) {
    let mut used = 0;
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process_tls_records(&mut input[used..]);
        let stop = match state {
            Err(e) => return (used + discard, Err(e)),
            Ok(ConnectionState::ReadTraffic(mut records)) => {
                while let Some(record) = records.next_record() {
                    match record {
                        Ok(r) => {
                            discard += r.discard;
                            plaintext.extend_from_slice(r.payload);
                        }
                        Err(e) => return (used + discard, Err(e)),
                    }
                }
                None
            }
            Ok(ConnectionState::EncodeTlsData(mut data)) => {
                let start = outgoing.len();
                if let Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) =
                    data.encode(&mut [])
                {
                    outgoing.resize(start + required_size, 0);
                    match data.encode(&mut outgoing[start..]) {
                        Ok(n) => outgoing.truncate(start + n),
                        Err(_) => outgoing.truncate(start),
                    }
                }
                None
            }
            // Queued in `outgoing`, which goes out in order before anything encrypted later.
            Ok(ConnectionState::TransmitTlsData(sent)) => {
                sent.done();
                None
            }
            Ok(ConnectionState::PeerClosed) => {
                *peer_closed = true;
                None
            }
            Ok(ConnectionState::Closed) => Some(Stop::Closed),
            Ok(ConnectionState::BlockedHandshake) => Some(Stop::Handshaking),
            Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                let start = outgoing.len();
                let result = match std::mem::replace(&mut job, Job::Process) {
                    Job::Process => Ok(0),
                    Job::Write(data) => {
                        let records = data.len().div_ceil(WRITE_CHUNK).max(1);
                        outgoing.resize(start + data.len() + records * RECORD_OVERHEAD, 0);
                        match traffic.encrypt(data, &mut outgoing[start..]) {
                            Err(EncryptError::InsufficientSize(InsufficientSizeError {
                                required_size,
                            })) => {
                                outgoing.resize(start + required_size, 0);
                                traffic.encrypt(data, &mut outgoing[start..])
                            }
                            r => r,
                        }
                    }
                    Job::Close => {
                        outgoing.resize(start + RECORD_OVERHEAD, 0);
                        match traffic.queue_close_notify(&mut outgoing[start..]) {
                            Err(EncryptError::InsufficientSize(InsufficientSizeError {
                                required_size,
                            })) => {
                                outgoing.resize(start + required_size, 0);
                                traffic.queue_close_notify(&mut outgoing[start..])
                            }
                            r => r,
                        }
                    }
                };
                match result {
                    Ok(n) => outgoing.truncate(start + n),
                    Err(e) => {
                        outgoing.truncate(start);
                        return (
                            used + discard,
                            Err(rustls::Error::General(format!("encrypting: {e}"))),
                        );
                    }
                }
                Some(Stop::Traffic)
            }
            // Early data is off (the default `max_early_data_size` of 0), so rustls never
            // offers it; anything newer than this code is a surprise, not data.
            Ok(other) => {
                return (
                    used + discard,
                    Err(rustls::Error::General(format!(
                        "unexpected TLS state {other:?}"
                    ))),
                )
            }
        };
        used += discard;
        if let Some(stop) = stop {
            return (used, Ok(stop));
        }
    }
}

fn tls_error(e: &rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.clone())
}

impl Tls {
    /// Runs rustls over what is buffered in `incoming`, then does `job`.
    fn run(&mut self, job: Job<'_>) -> Result<Stop, rustls::Error> {
        let (used, result) = drive(
            &mut self.conn,
            &mut self.incoming,
            &mut self.plaintext,
            &mut self.outgoing,
            &mut self.peer_closed,
            job,
        );
        self.consume_incoming(used);
        self.fail(result)
    }

    /// Runs rustls over `fresh` bytes just read from the socket.
    fn feed(&mut self, fresh: &mut [u8]) -> Result<Stop, rustls::Error> {
        if !self.incoming.is_empty() {
            if self.incoming.len() + fresh.len() > MAX_INCOMING {
                return self.fail(Err(rustls::Error::General("TLS input too large".into())));
            }
            self.incoming.extend_from_slice(fresh);
            return self.run(Job::Process);
        }
        // Nothing pending: process the bytes where they were read, keep only the rest.
        let (used, result) = drive(
            &mut self.conn,
            fresh,
            &mut self.plaintext,
            &mut self.outgoing,
            &mut self.peer_closed,
            Job::Process,
        );
        self.incoming
            .extend_from_slice(&fresh[used.min(fresh.len())..]);
        self.fail(result)
    }

    fn consume_incoming(&mut self, used: usize) {
        if used >= self.incoming.len() {
            self.incoming = Vec::new();
        } else {
            self.incoming.drain(..used);
        }
    }

    /// Records a fatal error, and has rustls encode the alert it queued for it.
    fn fail(&mut self, result: Result<Stop, rustls::Error>) -> Result<Stop, rustls::Error> {
        if let Err(e) = &result {
            if self.error.is_none() {
                self.error = Some(e.clone());
                // The alert comes out as `EncodeTlsData`, before rustls looks at its state
                // again (which now only returns the error).
                let (_, _) = drive(
                    &mut self.conn,
                    &mut [],
                    &mut self.plaintext,
                    &mut self.outgoing,
                    &mut self.peer_closed,
                    Job::Process,
                );
            }
        }
        result
    }

    /// Copies decrypted bytes into `buf`; frees the buffer once drained.
    fn take_plaintext(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let pending = &self.plaintext[self.plaintext_taken..];
        if pending.is_empty() {
            return false;
        }
        let n = pending.len().min(buf.remaining());
        buf.put_slice(&pending[..n]);
        self.plaintext_taken += n;
        if self.plaintext_taken == self.plaintext.len() {
            self.plaintext = Vec::new();
            self.plaintext_taken = 0;
        }
        true
    }

    /// Writes `outgoing` to the socket until it is empty (then frees it), or the socket is
    /// full: with `cx`, `Pending` and the write waker registered; without, `Ready` at once
    /// (the rest goes with a later write).
    fn send(&mut self, tcp: &TcpStream, cx: Option<&mut Context<'_>>) -> Poll<io::Result<()>> {
        let mut cx = cx;
        while self.outgoing_sent < self.outgoing.len() {
            if let Some(cx) = cx.as_deref_mut() {
                ready!(tcp.poll_write_ready(cx))?;
            }
            match tcp.try_write(&self.outgoing[self.outgoing_sent..]) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.outgoing_sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if cx.is_none() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.outgoing = Vec::new();
        self.deferred = false;
        self.outgoing_sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Reads once from the socket (registering the read waker when there is nothing) and
    /// runs rustls over what came. `Ok(false)` is EOF.
    fn poll_fill(&mut self, tcp: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        loop {
            ready!(tcp.poll_read_ready(cx))?;
            let result = SCRATCH.with_borrow_mut(|scratch| match read(tcp, scratch) {
                Ok(0) => Ok(None),
                Ok(n) => Ok(Some(self.feed(&mut scratch[..n]))),
                Err(e) => Err(e),
            });
            match result {
                Ok(None) => {
                    self.eof = true;
                    return Poll::Ready(Ok(false));
                }
                Ok(Some(Ok(_))) => return Poll::Ready(Ok(true)),
                Ok(Some(Err(e))) => {
                    let _ = self.send(tcp, None);
                    return Poll::Ready(Err(tls_error(&e)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Reads what the socket has into `buf`. A read shorter than `buf` took everything there
/// was, so the socket's readiness is cleared as tokio's own `poll_read` does: the next read
/// waits for more instead of finding `EAGAIN` with a system call.
fn read(tcp: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::io::Read as _;
    let mut got = 0;
    let result = tcp.try_io(Interest::READABLE, || {
        got = (&*socket2::SockRef::from(tcp)).read(buf)?;
        if got > 0 && got < buf.len() {
            // Tells tokio to clear the readiness it saw (not one that came since).
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(got)
    });
    match result {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        r => r,
    }
}

impl TlsStream {
    fn lock(&self) -> MutexGuard<'_, Tls> {
        self.0.tls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The TLS handshake on an accepted socket; the stream once it is complete. The caller
    /// bounds it with its handshake timeout.
    pub async fn accept(config: Arc<ServerConfig>, tcp: TcpStream) -> io::Result<TlsStream> {
        let conn = UnbufferedServerConnection::new(config).map_err(|e| tls_error(&e))?;
        let stream = TlsStream(Arc::new(Shared {
            tcp,
            tls: Mutex::new(Tls {
                conn,
                incoming: Vec::new(),
                plaintext: Vec::new(),
                plaintext_taken: 0,
                outgoing: Vec::new(),
                outgoing_sent: 0,
                deferred: false,
                peer_closed: false,
                eof: false,
                write_closed: false,
                error: None,
            }),
        }));
        std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
        Ok(stream)
    }

    fn poll_handshake(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let tcp = &self.0.tcp;
        let mut tls = self.lock();
        loop {
            if let Some(e) = &tls.error {
                return Poll::Ready(Err(tls_error(e)));
            }
            if let Err(e) = tls.run(Job::Process) {
                let _ = tls.send(tcp, None);
                return Poll::Ready(Err(tls_error(&e)));
            }
            // Done once TLS 1.3 reads the client's Finished: all that is left to send is the
            // session tickets, which then go with the first response (one send fewer per
            // handshake). TLS 1.2 may still owe its own Finished, which the client waits for.
            let tls13 = tls.conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
            if tls13 && !tls.conn.is_handshaking() {
                tls.deferred = !tls.outgoing.is_empty();
                return Poll::Ready(Ok(()));
            }
            ready!(tls.send(tcp, Some(cx)))?;
            if !tls.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if !ready!(tls.poll_fill(tcp, cx))? {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tls handshake eof",
                )));
            }
        }
    }

    /// Bytes held for this connection besides rustls' own state (for tests).
    #[cfg(test)]
    fn buffered(&self) -> usize {
        let tls = self.lock();
        tls.incoming.capacity() + tls.plaintext.capacity() + tls.outgoing.capacity()
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let tcp = &self.0.tcp;
        let mut tls = self.lock();
        loop {
            if buf.remaining() == 0 || tls.take_plaintext(buf) {
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = &tls.error {
                return Poll::Ready(Err(tls_error(e)));
            }
            if tls.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if tls.eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                )));
            }
            let queued = tls.outgoing.len();
            ready!(tls.poll_fill(tcp, cx))?;
            // What rustls wants sent in answer (a KeyUpdate, an alert) goes now if it can;
            // records queued before (the tickets) wait for the next write's flush.
            if tls.outgoing.len() > queued {
                let _ = tls.send(tcp, None);
            }
        }
    }
}

impl TlsStream {
    /// Encrypts up to one record of `data`; `Ready(n)` once `n` bytes are taken. Their
    /// ciphertext goes at the flush (or shutdown), or at once past `SEND_AT` pending.
    fn poll_write_plain(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let tcp = &self.0.tcp;
        let mut tls = self.lock();
        if let Some(e) = &tls.error {
            return Poll::Ready(Err(tls_error(e)));
        }
        if tls.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if tls.outgoing.len() - tls.outgoing_sent >= SEND_AT {
            ready!(tls.send(tcp, Some(cx)))?;
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let data = &data[..data.len().min(WRITE_CHUNK)];
        tls.deferred = false;
        match tls.run(Job::Write(data)) {
            Ok(Stop::Traffic) => {}
            Ok(_) => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            Err(e) => {
                let _ = tls.send(tcp, None);
                return Poll::Ready(Err(tls_error(&e)));
            }
        }
        // Records wait for the flush (one system call for a batch of writes, and for the
        // last frame with `close_notify` at shutdown), up to `SEND_AT`.
        if tls.outgoing.len() - tls.outgoing_sent >= SEND_AT {
            if let Poll::Ready(Err(e)) = tls.send(tcp, Some(cx)) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(data.len()))
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_plain(cx, buf)
    }

    /// Small frames are gathered into one record, as rustls' own `write_vectored` does.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let Some(first) = bufs.iter().find(|b| !b.is_empty()) else {
            return Poll::Ready(Ok(0));
        };
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if first.len() >= WRITE_CHUNK || first.len() == total {
            return self.poll_write_plain(cx, first);
        }
        GATHER.with_borrow_mut(|gathered| {
            gathered.clear();
            for b in bufs {
                let take = b.len().min(WRITE_CHUNK - gathered.len());
                gathered.extend_from_slice(&b[..take]);
                if gathered.len() == WRITE_CHUNK {
                    break;
                }
            }
            self.poll_write_plain(cx, gathered)
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let tcp = &self.0.tcp;
        let mut tls = self.lock();
        if tls.deferred {
            // Nothing the caller wrote is pending (hyper flushes before it has written).
            return Poll::Ready(Ok(()));
        }
        tls.send(tcp, Some(cx))
    }

    /// Sends `close_notify`, then the TCP FIN.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let tcp = &self.0.tcp;
        let mut tls = self.lock();
        tls.deferred = false;
        if !tls.write_closed && tls.error.is_none() {
            tls.write_closed = true;
            // A connection whose handshake never finished has nothing to close.
            let _ = tls.run(Job::Close);
        }
        ready!(tls.send(tcp, Some(cx)))?;
        match socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use std::io::Write as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A self-signed P-256 certificate from openssl, as the security tests make theirs; made
    /// once for the tests that run in parallel.
    fn server_config() -> Arc<ServerConfig> {
        static CONFIG: std::sync::OnceLock<Arc<ServerConfig>> = std::sync::OnceLock::new();
        CONFIG.get_or_init(make_server_config).clone()
    }

    fn make_server_config() -> Arc<ServerConfig> {
        let dir = std::env::temp_dir().join(format!("gw-conn-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        {
            let out = std::process::Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
                .args([
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-subj",
                    "/CN=localhost",
                ])
                .args(["-days", "2", "-keyout"])
                .arg(&key)
                .arg("-out")
                .arg(&crt)
                .output()
                .expect("openssl runs");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let chain = CertificateDer::pem_file_iter(&crt)
            .expect("cert")
            .collect::<Result<Vec<_>, _>>()
            .expect("cert");
        let key = PrivateKeyDer::from_pem_file(&key).expect("key");
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("config");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    fn client_config(version: &'static rustls::SupportedProtocolVersion) -> rustls::ClientConfig {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[version])
            .expect("versions")
            .dangerous()
            // Any certificate: these tests are about the records, not about who signed.
            .with_custom_certificate_verifier(Arc::new(loadtest::net::AcceptAny(provider())))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config
    }

    /// A server `TlsStream` and a tokio-rustls client over loopback.
    async fn pair(
        version: &'static rustls::SupportedProtocolVersion,
    ) -> (TlsStream, tokio_rustls::client::TlsStream<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            TlsStream::accept(server_config(), tcp).await
        });
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(version)));
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("localhost").expect("name");
        let client = connector
            .connect(name, tcp)
            .await
            .expect("client handshake");
        let server = server.await.expect("joined").expect("server handshake");
        assert_eq!(client.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        (server, client)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// A 300 KiB message each way at the same time (the server's reader and writer are two
    /// clones in two tasks, as in `serve_upgraded`), then 2,000 small frames each way, some as
    /// vectored writes of several frames; in between and after, the idle stream holds no
    /// buffer.
    #[tokio::test]
    async fn large_messages_and_small_frames_both_ways() {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let (server, client) = pair(version).await;
            let (mut client_rx, mut client_tx) = tokio::io::split(client);
            let (mut server_rx, mut server_tx) = (server.clone(), server.clone());

            let big_up = pattern(300 << 10, 1);
            let big_down = pattern(300 << 10, 2);
            let up = {
                let data = big_up.clone();
                tokio::spawn(async move {
                    client_tx.write_all(&data).await.expect("client writes");
                    client_tx.flush().await.expect("client flushes");
                    client_tx
                })
            };
            let down = {
                let data = big_down.clone();
                tokio::spawn(async move {
                    server_tx.write_all(&data).await.expect("server writes");
                    server_tx.flush().await.expect("server flushes");
                    server_tx
                })
            };
            let mut got_up = vec![0; big_up.len()];
            server_rx
                .read_exact(&mut got_up)
                .await
                .expect("server reads");
            let mut got_down = vec![0; big_down.len()];
            client_rx
                .read_exact(&mut got_down)
                .await
                .expect("client reads");
            assert!(got_up == big_up, "{version:?}: upstream bytes differ");
            assert!(got_down == big_down, "{version:?}: downstream bytes differ");
            let mut client_tx = up.await.expect("joined");
            let mut server_tx = down.await.expect("joined");
            assert_eq!(
                server.buffered(),
                0,
                "{version:?}: after the large messages"
            );

            // Small frames: one write each upstream; downstream in vectored batches of 1 to 4.
            let frames: Vec<Vec<u8>> = (0..2_000u32)
                .map(|i| format!("{{\"n\":{i}}}").into_bytes())
                .collect();
            let total: usize = frames.iter().map(Vec::len).sum();
            for f in &frames {
                client_tx.write_all(f).await.expect("client writes");
            }
            client_tx.flush().await.expect("client flushes");
            let mut got = vec![0; total];
            server_rx.read_exact(&mut got).await.expect("server reads");
            assert!(got == frames.concat(), "{version:?}: small frames upstream");
            for batch in frames
                .chunks(4)
                .enumerate()
                .map(|(i, c)| &c[..1 + i % 4.min(c.len())])
            {
                let mut slices: Vec<IoSlice<'_>> = batch.iter().map(|f| IoSlice::new(f)).collect();
                let mut left: usize = batch.iter().map(Vec::len).sum();
                let mut slices = &mut slices[..];
                while left > 0 {
                    let n = server_tx
                        .write_vectored(slices)
                        .await
                        .expect("server writes");
                    left -= n;
                    IoSlice::advance_slices(&mut slices, n);
                }
            }
            server_tx.flush().await.expect("server flushes");
            let sent: Vec<u8> = frames
                .chunks(4)
                .enumerate()
                .flat_map(|(i, c)| c[..1 + i % 4.min(c.len())].concat())
                .collect();
            let mut got = vec![0; sent.len()];
            client_rx.read_exact(&mut got).await.expect("client reads");
            assert!(got == sent, "{version:?}: small frames downstream");
            assert_eq!(server.buffered(), 0, "{version:?}: after the small frames");

            // A clean close each way: close_notify reads as EOF.
            server_tx.shutdown().await.expect("server shuts down");
            let mut rest = Vec::new();
            client_rx
                .read_to_end(&mut rest)
                .await
                .expect("client sees EOF");
            assert!(rest.is_empty());
            client_tx.shutdown().await.expect("client shuts down");
            let mut rest = Vec::new();
            server_rx
                .read_to_end(&mut rest)
                .await
                .expect("server sees EOF");
            assert!(rest.is_empty());
        }
    }

    /// A client that sends half a record and closes: the read fails with `UnexpectedEof`
    /// (as with tokio-rustls), and so does one that closes without `close_notify`.
    #[tokio::test]
    async fn client_closing_mid_record_is_unexpected_eof() {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let (mut server, client) = pair(version).await;
            let (mut tcp, mut conn) = client.into_inner();
            conn.writer()
                .write_all(&pattern(10_000, 3))
                .expect("buffered");
            let mut wire = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut wire).expect("encoded");
            }
            tcp.write_all(&wire[..wire.len() / 2])
                .await
                .expect("half sent");
            tcp.shutdown().await.expect("closed");
            let mut got = Vec::new();
            let err = server
                .read_to_end(&mut got)
                .await
                .expect_err("mid-record EOF");
            assert_eq!(
                err.kind(),
                io::ErrorKind::UnexpectedEof,
                "{version:?}: {err}"
            );
            // Whatever came before the cut was delivered, none of it twice.
            assert!(got.len() < 10_000);
            assert!(got == pattern(10_000, 3)[..got.len()]);

            let (mut server, client) = pair(version).await;
            // A FIN without close_notify (dropping the socket would reset it: the session
            // tickets are still unread).
            let (mut tcp, _) = client.into_inner();
            tcp.shutdown().await.expect("closed");
            let err = server
                .read(&mut [0; 16])
                .await
                .expect_err("EOF without close_notify");
            assert_eq!(
                err.kind(),
                io::ErrorKind::UnexpectedEof,
                "{version:?}: {err}"
            );
        }
    }

    /// Garbage instead of a ClientHello fails the handshake with `InvalidData`, and the
    /// client gets an alert.
    #[tokio::test]
    async fn garbage_fails_the_handshake() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            TlsStream::accept(server_config(), tcp).await.map(|_| ())
        });
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("sent");
        let err = server.await.expect("joined").expect_err("not TLS");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        let mut reply = Vec::new();
        let _ = tcp.read_to_end(&mut reply).await;
        assert_eq!(reply.first(), Some(&21), "an alert record: {reply:?}");
    }
}
