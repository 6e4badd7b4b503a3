//! Request bodies: the size limit, the read timeout, and the rule that keeps a body nobody read
//! from holding its connection open.
//!
//! actix ends an HTTP/1 request whose body was not read to the end in one of two ways: if the
//! body stream is still held when the response is written, it closes the connection; if the
//! stream was dropped, it keeps the connection and drains the rest of a chunked body first —
//! and a client that stalls mid-body never lets that drain finish. So every request's body
//! stream is parked in a [`BodySlot`] by [`hold_unread_body`] and stays alive until its response
//! is written; a handler that reads the body takes it from the slot, and gives it back if it
//! stops early.
use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header::CONTENT_LENGTH;
use actix_web::middleware::Next;
use actix_web::{HttpMessage, HttpRequest, web};
use futures_util::StreamExt;

use crate::error::{Result, ServeError};
use crate::server::{BodyLimits, HttpConfig};

/// A request's body stream, where its handler can take it and give it back.
#[derive(Clone)]
struct BodySlot(Rc<RefCell<Option<Payload>>>);

/// Middleware: park the request's body stream in a slot the response body keeps alive.
pub async fn hold_unread_body(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> std::result::Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let slot = BodySlot(Rc::new(RefCell::new(Some(req.take_payload()))));
    req.extensions_mut().insert(slot.clone());
    let res = next.call(req).await?;
    Ok(res.map_body(move |_, body| Held { body: body.boxed(), _slot: slot }))
}

/// A response body that keeps its request's body stream alive until it is dropped.
struct Held {
    body: BoxBody,
    _slot: BodySlot,
}

impl MessageBody for Held {
    type Error = <BoxBody as MessageBody>::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<web::Bytes, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_next(cx)
    }
}

/// The whole body: refused (413) at once when its Content-Length is over the limit, and as
/// soon as more than the limit has arrived otherwise (chunked bodies); 408 when it has not all
/// arrived within the body timeout. A refused body goes back to its slot, so the connection
/// closes after the error response.
pub async fn read_body(req: &HttpRequest) -> Result<web::Bytes> {
    let limits = req
        .app_data::<web::Data<BodyLimits>>()
        .map_or_else(|| BodyLimits::of(&HttpConfig::default()), |l| *l.get_ref());
    let limit = limits.max_bytes;
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
    if declared.is_some_and(|n: u64| n > limit as u64) {
        return Err(ServeError::TooLarge { limit });
    }
    let slot = req.extensions().get::<BodySlot>().cloned();
    let mut payload = match &slot {
        Some(s) => s.0.borrow_mut().take().unwrap_or(Payload::None),
        None => Payload::None,
    };
    let read = async {
        let mut body = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk =
                chunk.map_err(|e| ServeError::invalid(format!("reading the body: {e}"), None))?;
            if body.len() + chunk.len() > limit {
                return Err(ServeError::TooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    let result = match tokio::time::timeout(limits.timeout, read).await {
        Ok(r) => r,
        Err(_) => Err(ServeError::Timeout(format!(
            "the request body did not arrive within {:?}",
            limits.timeout
        ))),
    };
    if result.is_err()
        && let Some(s) = slot
    {
        *s.0.borrow_mut() = Some(payload);
    }
    result
}
