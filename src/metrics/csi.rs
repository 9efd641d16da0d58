//! The CSI servers' tower layer: every call counted by method and gRPC code, with its latency,
//! and the node's stage and unstage (attach, detach) in a histogram of their own. It reads only
//! the request path and the answer's `grpc-status`; it must not look into messages.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::http::{Request, Response};

/// Put on a tonic `Server::builder()` with `.layer(CsiMetricsLayer)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct CsiMetricsLayer;

impl<S> tower::Layer<S> for CsiMetricsLayer {
    type Service = CsiMetrics<S>;

    fn layer(&self, inner: S) -> CsiMetrics<S> {
        CsiMetrics { inner }
    }
}

#[derive(Clone, Debug)]
pub struct CsiMetrics<S> {
    inner: S,
}

/// The method of a CSI call's path (`/csi.v1.Node/NodeStageVolume` → `NodeStageVolume`); None
/// for other services.
pub(super) fn csi_method(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/csi.v1.")?;
    let (_, method) = rest.split_once('/')?;
    (!method.is_empty()).then_some(method)
}

/// The code of an answer: a unary call that failed answers in its headers ("trailers only");
/// one that succeeded sends its status in the trailers, after the message, so no code in the
/// headers means OK.
pub(super) fn answer_code(headers: &axum::http::HeaderMap) -> tonic::Code {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32)
}

impl<S, B, RB> tower::Service<Request<B>> for CsiMetrics<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let method = csi_method(req.uri().path()).map(str::to_string);
        let started = Instant::now();
        let answer = self.inner.call(req);
        Box::pin(async move {
            let r = answer.await;
            if let Some(method) = method {
                let code = match &r {
                    Ok(resp) => answer_code(resp.headers()),
                    Err(_) => tonic::Code::Unknown,
                };
                crate::counters::csi_call(&method, code, started.elapsed().as_secs_f64());
            }
            r
        })
    }
}
