//! The HTTP server's lifecycle and its limits on clients. Every way a client can hold a
//! connection has a clock: the request head (actix's client request timeout), the body (read in
//! the handlers under `body_timeout`), the idle time between requests (keep-alive), and the
//! connection count is capped below the file-descriptor limit, so slow or idle clients are
//! dropped in bounded time and cannot pin the server.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};

use crate::body::hold_unread_body;
use crate::error::{Result, ServeError};
use crate::http::{AppState, routes};

/// Largest request body accepted by default; prompts longer than any context fit well below it.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// Where the server listens and how long it waits for clients.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    pub host: String,
    /// 0 picks a free port.
    pub port: u16,
    /// Worker threads; 0 = one per core.
    pub workers: usize,
    /// Time a client has to send a request's head (request line and headers) after connecting
    /// or after its keep-alive wait ends; then the connection gets a 408 and is closed.
    pub request_timeout: Duration,
    /// Time a client has to send a request's body once its head is in; then a 408 (in
    /// OpenAI's error format) and the connection is closed.
    pub body_timeout: Duration,
    /// How long a connection may sit idle between requests; zero closes after every response.
    pub keep_alive: Duration,
    /// Most open connections, all workers together; more wait in the listen backlog until one
    /// closes.
    pub max_connections: usize,
    /// Largest request body; a larger Content-Length is refused (413) before the body is read.
    pub max_body_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            host: "127.0.0.1".into(),
            port: 8000,
            workers: 0,
            request_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(15),
            max_connections: 4096,
            max_body_bytes: MAX_BODY_BYTES,
        }
    }
}

/// What the handlers need to read a body safely.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    pub max_bytes: usize,
    pub timeout: Duration,
}

impl BodyLimits {
    pub fn of(c: &HttpConfig) -> BodyLimits {
        BodyLimits { max_bytes: c.max_body_bytes, timeout: c.body_timeout }
    }
}

/// Start the HTTP server on its own thread (with its own actix runtime) and return once it
/// listens.
pub fn start(state: Arc<AppState>, config: &HttpConfig) -> Result<RunningServer> {
    if config.request_timeout.is_zero() || config.body_timeout.is_zero() {
        return Err(ServeError::invalid("request and body timeouts must be above zero", None));
    }
    if config.max_connections == 0 {
        return Err(ServeError::invalid("max connections must be at least 1", None));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let c = config.clone();
    let workers = match c.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        w => w,
    };
    let limits = BodyLimits::of(&c);
    let thread = std::thread::Builder::new().name("http".into()).spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let data = web::Data::from(state);
            let limits = web::Data::new(limits);
            let server = HttpServer::new(move || {
                App::new()
                    .app_data(data.clone())
                    .app_data(limits.clone())
                    .wrap(from_fn(hold_unread_body))
                    .configure(routes)
            })
            .disable_signals()
            .workers(workers)
            .client_request_timeout(c.request_timeout)
            .keep_alive(c.keep_alive)
            // actix counts per worker.
            .max_connections(c.max_connections.div_ceil(workers))
            // A client that closes its side is gone: stop its handler, which drops its events
            // channel and so cancels its generation (a non-streaming reply is computed inside
            // the handler, before any byte is sent).
            .h1_allow_half_closed(false);
            let server = match server.bind((c.host.as_str(), c.port)) {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return Ok(());
                }
            };
            let addr = server.addrs().first().copied();
            let server = server.run();
            let _ = tx.send(Ok((addr, server.handle())));
            server.await
        })
    })?;
    let (addr, handle) = rx
        .recv()
        .map_err(|_| ServeError::Engine("the HTTP thread died while starting".into()))??;
    let addr = addr.ok_or_else(|| ServeError::Engine("the server bound no address".into()))?;
    Ok(RunningServer { addr, handle, thread: Some(thread) })
}

/// A server started by [`start`].
pub struct RunningServer {
    pub addr: SocketAddr,
    handle: actix_web::dev::ServerHandle,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl RunningServer {
    /// Serve until the server stops.
    pub fn join(mut self) -> Result<()> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => Ok(r?),
            Some(Err(_)) => Err(ServeError::Engine("the HTTP thread panicked".into())),
            None => Ok(()),
        }
    }

    /// Stop accepting connections and end the server (in-flight streams are dropped).
    pub fn stop(mut self) {
        let stop = self.handle.stop(false);
        // A throwaway runtime drives the stop future: the caller may be outside any runtime.
        actix_web::rt::System::new().block_on(stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
