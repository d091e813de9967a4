//! The HTTP/1.1 server: accepts connections, bounds them, and serves each with hyper's
//! `http1` connection until shutdown, which lets in-flight requests finish.
//!
//! Bounds, and why each exists:
//! - a request head must arrive within [`HEADER_READ_TIMEOUT`] of its first byte (of the
//!   accept, for a connection's first request), else 408 `request_timeout`: a client
//!   trickling one byte a second cannot hold a connection;
//! - a keep-alive connection waiting for its next request is closed after
//!   [`KEEP_ALIVE_IDLE`];
//! - at most [`Limits::max_connections`] connections are kept, derived from
//!   `RLIMIT_NOFILE` so that the database pool, HTTP clients and files always find a
//!   descriptor, and accept keeps being called. At the cap the connection idle the longest
//!   (waiting for a request, or still sending its head) is closed to admit the newcomer; if
//!   every connection is inside a request, the newcomer gets 503 `unavailable` with
//!   `Retry-After`.
//!
//! Each connection's bytes pass through [`Guarded`], which reads every request head itself
//! before hyper sees it, so that refusals of the head are problem+json like the rest of
//! the contract: a control character or bad token (400 `invalid_request`), a repeated
//! `Content-Length` or one beside `Transfer-Encoding` (400, a smuggling vector), more than
//! [`MAX_HEADERS`] headers or a head over [`MAX_HEAD_BYTES`] (431 `headers_too_large`), and
//! the header timeout (408). It follows the message framing (`Content-Length` bodies) to
//! find the next head on a keep-alive connection.
//!
//! What is not problem+json: after a request with a chunked body the framing is hyper's
//! alone, so such a request's response closes the connection (`Connection: close`) rather
//! than leave later heads unchecked. A head hyper refuses after `httparse` accepted it
//! (e.g. HTTP/1.0 with `Transfer-Encoding`) still gets hyper's bare status line. A peer
//! that stops reading while its refusal is written is dropped after [`REPLY_LINGER`]
//! without an answer.

use super::error::ApiError;
use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, Uri, header};
use bytes::{Buf, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use crate::shutdown::Shutdown;

/// A request head (request line and headers) must be complete this long after its first
/// byte: ample for any real client, and what bounds a slowloris.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A keep-alive connection with no request in progress is closed after this long: clients
/// reuse a connection within seconds or not at all, and an idle one costs a descriptor.
pub const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(30);

/// Connections kept at most, whatever the descriptor limit: beyond this, memory and
/// scheduling matter more than descriptors.
pub const MAX_CONNECTIONS: usize = 4096;

/// Descriptors left for everything but HTTP connections: the database pool (SQLite opens
/// three files per pooled connection, PostgreSQL one socket each), the provider, webhook
/// and analytics HTTP clients, the runtime and the 503 answers of [`REFUSALS_IN_FLIGHT`].
pub const RESERVED_FDS: usize = 48;

/// The fewest connections kept even under a tiny descriptor limit.
pub const MIN_CONNECTIONS: usize = 8;

/// Newcomers being told 503 at once; beyond this they are closed without an answer.
pub const REFUSALS_IN_FLIGHT: usize = 8;

/// Headers a request may carry (hyper's own default limit, answered here as problem+json).
pub const MAX_HEADERS: usize = 100;

/// The longest request head read: a request line plus [`super::MAX_HEADER_BYTES`] of
/// headers, with room to spare. Between the two, the router's own check answers 431.
pub const MAX_HEAD_BYTES: usize = 2 * super::MAX_HEADER_BYTES;

/// How long a refusal (408, 400, 431, 503) may take to write, and how long the
/// connection then lingers to drain the peer's remaining bytes so the answer is not lost
/// to a reset.
pub const REPLY_LINGER: Duration = Duration::from_secs(2);

/// Connections past the cap while idle ones close to make room: the accept loop waits
/// rather than run ahead of the closing (part of [`RESERVED_FDS`]).
pub const EVICTION_OVERSHOOT: usize = 4;

/// The pause after `accept` fails for lack of descriptors, so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(20);

/// The server's bounds ([`crate::app::Tuning::http`]); tests shrink them.
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub keep_alive_idle: Duration,
    /// `None`: derived from `RLIMIT_NOFILE` (see [`connection_cap`]).
    pub max_connections: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: HEADER_READ_TIMEOUT,
            keep_alive_idle: KEEP_ALIVE_IDLE,
            max_connections: None,
        }
    }
}

/// Connections to keep: the descriptor limit less [`RESERVED_FDS`], within
/// [`MIN_CONNECTIONS`]..=[`MAX_CONNECTIONS`].
pub fn connection_cap() -> usize {
    let soft = fd_limit().unwrap_or(1024);
    let soft = usize::try_from(soft).unwrap_or(usize::MAX);
    soft.saturating_sub(RESERVED_FDS)
        .clamp(MIN_CONNECTIONS, MAX_CONNECTIONS)
}

fn fd_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into the struct it is given.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    ok.then_some(limit.rlim_cur)
}

/// Serves `router` on `listener` until `shutdown`, then waits for open connections to
/// finish their requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: Shutdown,
) -> io::Result<()> {
    let cap = limits.max_connections.unwrap_or_else(connection_cap);
    tracing::info!(max_connections = cap, "HTTP server accepting");
    let registry = Arc::new(Registry::default());
    let refusals = Arc::new(tokio::sync::Semaphore::new(REFUSALS_IN_FLIGHT));
    let mut builder = hyper::server::conn::http1::Builder::new();
    // hyper's own header timer runs from the end of one response to the next head, which
    // `Guarded` hands over whole: it only backs up the bounds above (and keeps hyper
    // polling reads when a connection goes idle, which starts the idle timer).
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.keep_alive_idle + limits.header_read_timeout + REPLY_LINGER);
    let limits = Arc::new(limits);
    let mut connections = tokio::task::JoinSet::new();
    let mut stop = shutdown.clone();
    loop {
        while registry.len() >= cap + EVICTION_OVERSHOOT && !stop.is_triggered() {
            tokio::select! {
                _ = registry.closed.notified() => {}
                _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
            }
        }
        let accepted = tokio::select! {
            _ = stop.wait() => break,
            accepted = listener.accept() => accepted,
        };
        while connections.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                if out_of_descriptors(&error) {
                    tracing::warn!(%error, "accept: out of descriptors; closing an idle connection");
                    registry.make_room(0);
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
                continue;
            }
        };
        match registry.make_room(cap) {
            Room::Free => {}
            Room::Evicted => tokio::task::yield_now().await,
            Room::None => {
                refuse(stream, &refusals);
                continue;
            }
        }
        let _ = stream.set_nodelay(true);
        let watch = registry.register();
        let guarded = Guarded::new(stream, watch.clone(), limits.clone());
        let service = hyper::service::service_fn({
            let router = router.clone();
            let watch = watch.clone();
            move |request: Request<Incoming>| handle(router.clone(), watch.clone(), peer, request)
        });
        let connection = builder.serve_connection(TokioIo::new(guarded), service);
        let mut stop = shutdown.clone();
        let registry = registry.clone();
        connections.spawn(async move {
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stop.wait() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, %peer, "connection ended with an error");
            }
            registry.remove(watch.id);
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

fn out_of_descriptors(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// One request through the router, with the peer address for `ConnectInfo` and a guard
/// that marks the request finished once its response body is done (or dropped).
async fn handle(
    router: Router,
    watch: Arc<Watch>,
    peer: SocketAddr,
    mut request: Request<Incoming>,
) -> Result<axum::response::Response, Infallible> {
    let finished = Finished(watch.clone());
    request.extensions_mut().insert(ConnectInfo(peer));
    let response = router
        .oneshot(request.map(Body::new))
        .await
        .unwrap_or_else(|never| match never {});
    let (mut parts, body) = response.into_parts();
    if watch.close_after_response.load(Ordering::Acquire) {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let body = body.map_frame(move |frame| {
        let _finished = &finished;
        frame
    });
    Ok(axum::response::Response::from_parts(parts, Body::new(body)))
}

/// Marks one request finished when dropped.
struct Finished(Arc<Watch>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::AcqRel);
        self.0.wake();
    }
}

/// A newcomer when every connection is inside a request: 503 and close.
fn refuse(mut stream: TcpStream, refusals: &Arc<tokio::sync::Semaphore>) {
    let Ok(permit) = refusals.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let reply = raw_response(&ApiError::AtCapacity);
        let _ = tokio::time::timeout(REPLY_LINGER, async {
            stream.write_all(&reply).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 4096];
            loop {
                if tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await? == 0 {
                    return Ok::<_, io::Error>(());
                }
            }
        })
        .await;
        drop(permit);
    });
}

/// A whole HTTP/1.1 response for `error`, written straight to the socket.
fn raw_response(error: &ApiError) -> Vec<u8> {
    let status = error.status();
    let body = serde_json::to_vec(&error.problem()).unwrap_or_default();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        super::error::PROBLEM_JSON,
        body.len(),
    );
    if let ApiError::AtCapacity = error {
        head.push_str(&format!(
            "retry-after: {}\r\n",
            super::error::AT_CAPACITY_RETRY_SECS
        ));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&body);
    bytes
}

/// The open connections, for the cap and for closing the idlest.
#[derive(Default)]
struct Registry {
    connections: Mutex<HashMap<u64, Arc<Watch>>>,
    next_id: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
    /// Notified whenever a connection ends.
    closed: tokio::sync::Notify,
}

impl Registry {
    fn now_ms(&self) -> u64 {
        let epoch = *self.epoch.get_or_init(Instant::now);
        epoch.elapsed().as_millis() as u64
    }

    fn register(&self) -> Arc<Watch> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let watch = Arc::new(Watch {
            id,
            idle_since_ms: AtomicU64::new(self.now_ms()),
            epoch: Some(*self.epoch.get_or_init(Instant::now)),
            ..Watch::default()
        });
        self.lock().insert(id, watch.clone());
        watch
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
        self.closed.notify_waiters();
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Watch>>> {
        self.connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps the connections under `cap`: below it there is room; at it, the connection
    /// idle the longest is asked to close (or, failing that, one lingering over a refusal),
    /// and the newcomer is admitted while it does.
    fn make_room(&self, cap: usize) -> Room {
        let connections = self.lock();
        if connections.len() < cap {
            return Room::Free;
        }
        let asked = |w: &&Arc<Watch>| w.evict.load(Ordering::Acquire);
        let closing = |w: &&Arc<Watch>| w.closing.load(Ordering::Acquire);
        let idlest = connections
            .values()
            .filter(|w| !asked(w) && !closing(w) && w.is_idle())
            .min_by_key(|w| w.idle_since_ms.load(Ordering::Acquire));
        let victim = idlest.or_else(|| connections.values().find(|w| !asked(w) && closing(w)));
        match victim {
            Some(watch) => {
                watch.evict.store(true, Ordering::Release);
                watch.wake();
                Room::Evicted
            }
            // Some are closing already: their descriptors are about to be free.
            None if connections.values().any(|w| asked(&w)) => Room::Evicted,
            None => Room::None,
        }
    }
}

/// What [`Registry::make_room`] found.
enum Room {
    Free,
    Evicted,
    None,
}

/// Between requests, no head byte yet.
const WAITING: u8 = 0;
/// Part of a request head received.
const IN_HEAD: u8 = 1;
/// Inside a request (its head is complete).
const IN_REQUEST: u8 = 2;

/// What the server and a connection's [`Guarded`] stream share.
#[derive(Default)]
struct Watch {
    id: u64,
    /// Heads handed to hyper, and requests whose responses are done: equal when no request
    /// is in progress.
    released: AtomicU64,
    finished: AtomicU64,
    /// [`WAITING`], [`IN_HEAD`] or [`IN_REQUEST`], as the byte stream shows it.
    phase: AtomicU8,
    /// Since when (ms from the registry's epoch) the connection has been idle.
    idle_since_ms: AtomicU64,
    epoch: Option<Instant>,
    /// Set by the server to close this connection if it is idle.
    evict: AtomicBool,
    /// The connection is closing (a refusal being written, or end-of-stream given).
    closing: AtomicBool,
    /// A request's body is chunked: the connection ends after its response.
    close_after_response: AtomicBool,
    /// The reader to wake when a request finishes or an eviction is asked.
    waker: Mutex<Option<Waker>>,
}

impl Watch {
    fn in_request(&self) -> bool {
        self.released.load(Ordering::Acquire) != self.finished.load(Ordering::Acquire)
    }

    fn is_idle(&self) -> bool {
        !self.in_request() && self.phase.load(Ordering::Acquire) != IN_REQUEST
    }

    fn mark_idle(&self, phase: u8) {
        self.phase.store(phase, Ordering::Release);
        if let Some(epoch) = self.epoch {
            self.idle_since_ms
                .store(epoch.elapsed().as_millis() as u64, Ordering::Release);
        }
    }

    fn wake(&self) {
        let waker = self
            .waker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn park(&self, cx: &Context<'_>) {
        *self
            .waker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(cx.waker().clone());
    }
}

/// Where the byte stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Expecting a request head.
    Head,
    /// Inside a `Content-Length` body: this many bytes to go.
    Body(u64),
    /// After a chunked head: bytes go to hyper as they come.
    PassThrough,
}

/// Which timer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    None,
    /// Nothing received since the last response (or the accept): close quietly.
    Idle,
    /// Part of a head received: answer 408.
    Head,
    /// Writing a refusal and draining.
    Linger,
}

/// A connection's socket as hyper sees it: request heads are read and checked here
/// first, and handed over only when complete and well formed.
struct Guarded {
    inner: TcpStream,
    watch: Arc<Watch>,
    limits: Arc<Limits>,
    framing: Framing,
    /// Head bytes not yet checked complete.
    head: BytesMut,
    /// When the head in progress began (for the first request: the accept).
    head_started: Instant,
    /// No request read yet on this connection.
    fresh: bool,
    /// Checked bytes hyper has yet to read.
    ready: BytesMut,
    timer: Timer,
    /// When the head timer fires (heads differ in when they began).
    timer_at: Option<Instant>,
    sleep: Pin<Box<Sleep>>,
    /// A refusal to write before closing; `ended` once hyper has been told end-of-stream.
    reply: Option<bytes::Bytes>,
    ended: bool,
    reply_sent: bool,
}

impl Guarded {
    fn new(inner: TcpStream, watch: Arc<Watch>, limits: Arc<Limits>) -> Self {
        let now = Instant::now();
        Self {
            inner,
            watch,
            limits,
            framing: Framing::Head,
            head: BytesMut::new(),
            head_started: now,
            fresh: true,
            ready: BytesMut::new(),
            timer: Timer::None,
            timer_at: None,
            sleep: Box::pin(tokio::time::sleep_until(now)),
            reply: None,
            ended: false,
            reply_sent: false,
        }
    }

    /// Refuses the request in progress: hyper sees end-of-stream and closes, and
    /// `poll_shutdown` writes `error` first.
    fn refuse(&mut self, error: ApiError) {
        tracing::info!(
            status = error.status().as_u16(),
            code = error.code(),
            "request head refused"
        );
        self.reply = Some(raw_response(&error).into());
        self.end();
    }

    fn end(&mut self) {
        self.ended = true;
        self.watch.closing.store(true, Ordering::Release);
        self.head.clear();
        self.ready.clear();
    }

    /// Feeds bytes read from the socket through the framing: body bytes go to hyper as
    /// they come, head bytes once their head is complete and checked.
    fn ingest(&mut self, bytes: &[u8]) {
        let mut rest = bytes::Bytes::copy_from_slice(bytes);
        while !rest.is_empty() && !self.ended {
            match self.framing {
                Framing::PassThrough => {
                    self.ready.extend_from_slice(&rest);
                    return;
                }
                Framing::Body(remaining) => {
                    let take = remaining.min(rest.len() as u64) as usize;
                    self.ready.extend_from_slice(&rest.split_to(take));
                    self.framing = match remaining - take as u64 {
                        0 => Framing::Head,
                        left => Framing::Body(left),
                    };
                }
                Framing::Head => {
                    if self.head.is_empty() && !self.fresh {
                        self.head_started = Instant::now();
                    }
                    self.head.extend_from_slice(&rest);
                    rest = bytes::Bytes::new();
                    match self.check_head() {
                        Ok(Some(len)) => {
                            let head = self.head.split_to(len);
                            self.ready.extend_from_slice(&head);
                            // What follows the head: its body, perhaps another request.
                            rest = self.head.split().freeze();
                        }
                        Ok(None) => {}
                        Err(error) => self.refuse(error),
                    }
                }
            }
        }
    }

    /// `Ok(Some(len))` when `head` holds a complete, acceptable head of `len` bytes (and
    /// the framing is set for its body); `Ok(None)` while incomplete.
    fn check_head(&mut self) -> Result<Option<usize>, ApiError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let len = match request.parse(&self.head) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => {
                return if self.head.len() > MAX_HEAD_BYTES {
                    Err(ApiError::HeadersTooLarge)
                } else {
                    Ok(None)
                };
            }
            Err(httparse::Error::TooManyHeaders) => return Err(ApiError::TooManyHeaders),
            Err(error) => {
                return Err(ApiError::InvalidRequest(format!(
                    "malformed request head: {error}"
                )));
            }
        };
        if request
            .path
            .is_some_and(|path| Uri::try_from(path).is_err())
        {
            return Err(ApiError::InvalidRequest(
                "malformed request target".to_owned(),
            ));
        }
        let mut length: Option<u64> = None;
        let mut chunked = false;
        for h in request.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                if length.is_some() {
                    return Err(ApiError::InvalidRequest(
                        "more than one Content-Length header".to_owned(),
                    ));
                }
                let digits = std::str::from_utf8(h.value)
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()));
                length = Some(digits.and_then(|v| v.parse().ok()).ok_or_else(|| {
                    ApiError::InvalidRequest("Content-Length is not a number".to_owned())
                })?);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = true;
            }
        }
        if chunked && length.is_some() {
            return Err(ApiError::InvalidRequest(
                "Content-Length and Transfer-Encoding together".to_owned(),
            ));
        }
        self.framing = if chunked {
            self.watch
                .close_after_response
                .store(true, Ordering::Release);
            Framing::PassThrough
        } else {
            match length.unwrap_or(0) {
                0 => Framing::Head,
                n => Framing::Body(n),
            }
        };
        self.fresh = false;
        self.watch.phase.store(IN_REQUEST, Ordering::Release);
        self.watch.released.fetch_add(1, Ordering::AcqRel);
        Ok(Some(len))
    }

    /// The timer the stream's state calls for, and when it fires.
    fn wanted_timer(&self) -> (Timer, Option<Instant>) {
        if self.framing != Framing::Head || self.watch.in_request() {
            return (Timer::None, None);
        }
        if self.head.is_empty() && !self.fresh {
            return (Timer::Idle, None);
        }
        (
            Timer::Head,
            Some(self.head_started + self.limits.header_read_timeout),
        )
    }

    /// Arms the wanted timer; true if it has fired.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> bool {
        let (wanted, at) = self.wanted_timer();
        if wanted != self.timer || (wanted == Timer::Head && at != self.timer_at) {
            self.timer = wanted;
            self.timer_at = at;
            let deadline = match wanted {
                Timer::None | Timer::Linger => return false,
                Timer::Idle => {
                    self.watch.mark_idle(WAITING);
                    Instant::now() + self.limits.keep_alive_idle
                }
                Timer::Head => {
                    self.watch.mark_idle(IN_HEAD);
                    at.unwrap_or_else(Instant::now)
                }
            };
            self.sleep.as_mut().reset(deadline);
        }
        if self.timer == Timer::None {
            return false;
        }
        self.sleep.as_mut().poll(cx).is_ready()
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.ended {
                return Poll::Ready(Ok(()));
            }
            if this.watch.evict.load(Ordering::Acquire) && this.framing == Framing::Head {
                if this.watch.in_request() {
                    // Busy after all: keep it.
                    this.watch.evict.store(false, Ordering::Release);
                } else if this.head.is_empty() {
                    this.end();
                    continue;
                } else {
                    // Written if the socket takes it at once; no lingering (see poll_shutdown).
                    this.refuse(ApiError::AtCapacity);
                    continue;
                }
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    // The peer closed: a partial head is dropped, hyper sees the end.
                    this.end();
                }
                Poll::Ready(Ok(())) => {
                    let filled = read.filled().to_vec();
                    this.ingest(&filled);
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {
                    this.watch.park(cx);
                    if !this.poll_timer(cx) {
                        return Poll::Pending;
                    }
                    match this.timer {
                        Timer::Head if !this.head.is_empty() => {
                            this.refuse(ApiError::RequestTimeout)
                        }
                        _ => this.end(),
                    }
                }
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    /// Writes a pending refusal, half-closes, and drains what the peer still sends (for
    /// [`REPLY_LINGER`] at most) so that closing does not reset the answer away.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.reply.is_none() {
            return Pin::new(&mut this.inner).poll_shutdown(cx);
        }
        if this.timer != Timer::Linger {
            this.timer = Timer::Linger;
            this.sleep.as_mut().reset(Instant::now() + REPLY_LINGER);
        }
        // Asked to make room: one attempt at the answer, no waiting and no draining.
        let hurry = this.watch.evict.load(Ordering::Acquire);
        if this.sleep.as_mut().poll(cx).is_ready() {
            this.reply = None;
            return Poll::Ready(Ok(()));
        }
        this.watch.park(cx);
        while !this.reply_sent {
            let Some(reply) = this.reply.as_mut() else {
                break;
            };
            match Pin::new(&mut this.inner).poll_write(cx, reply) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    this.reply = None;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(n)) => {
                    reply.advance(n);
                    if reply.is_empty() {
                        this.reply_sent = true;
                    }
                }
                Poll::Pending if hurry => {
                    this.reply = None;
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        if hurry {
            this.reply = None;
            return Pin::new(&mut this.inner).poll_shutdown(cx);
        }
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => {
                this.reply = None;
                return Poll::Ready(Ok(()));
            }
            Poll::Pending => return Poll::Pending,
        }
        loop {
            let mut sink = [0u8; 4096];
            let mut read = ReadBuf::new(&mut sink);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if !read.filled().is_empty() => continue,
                Poll::Ready(_) => {
                    this.reply = None;
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
