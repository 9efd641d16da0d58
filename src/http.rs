//! The HTTP API on loopback: health, and read access to bicsi's objects for the CLI and for
//! people. Handlers are thin: they call the domain and map errors with `Error::http_status`.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::controller::Controller;
use crate::error::Error;

#[derive(Clone)]
pub struct ApiState {
    pub controller: Arc<Controller>,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            Json(serde_json::json!({ "error": self.to_string(), "code": format!("{:?}", self.code()) })),
        )
            .into_response()
    }
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/volumes", get(list_volumes))
        .with_state(state)
}

async fn list_volumes(State(s): State<ApiState>) -> Result<Json<serde_json::Value>, Error> {
    let (volumes, _) = s.controller.list_volumes(0, "")?;
    Ok(Json(serde_json::to_value(volumes)?))
}
