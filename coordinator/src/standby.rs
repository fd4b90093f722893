//! HTTP on a standby coordinator: everything but `/health` is redirected
//! (307, method and body kept) to the elected leader, whose record in etcd
//! names its HTTP address. With no leader known yet, a clear 503.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use tokio::sync::watch;

use crate::leader::Role;

/// Wraps `router` so it serves only while this coordinator leads.
pub fn leader_only(router: Router, role: watch::Receiver<Role>) -> Router {
    router.layer(axum::middleware::from_fn_with_state(role, redirect))
}

async fn redirect(State(role): State<watch::Receiver<Role>>, req: Request, next: Next) -> Response {
    let leader = match &*role.borrow() {
        Role::Leader => None,
        Role::Standby(l) => Some(l.clone()),
    };
    match leader {
        None => next.run(req).await,
        Some(_) if req.uri().path() == "/health" => next.run(req).await,
        Some(Some(l)) => {
            let path = req.uri().path_and_query().map_or("/", axum::http::uri::PathAndQuery::as_str);
            let location = format!("{}{path}", l.http.trim_end_matches('/'));
            (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, location)], format!("standby: the leader is {}\n", l.id))
                .into_response()
        }
        Some(None) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"error": {"message": "standby coordinator: no leader elected yet", "type": "server_error"}})),
        )
            .into_response(),
    }
}
