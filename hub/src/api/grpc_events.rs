//! gRPC `berth.v1.EventService`: the same stream as `GET /v1/events?watch=true`.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::events::{self, Cursor};
use crate::service::ServiceError;
use crate::store::Store;
use berth_proto::v1;
use berth_proto::v1::event_service_server::{EventService, EventServiceServer};

/// The event service over one store.
#[derive(Debug, Clone)]
pub struct GrpcEvents {
    store: Store,
}

impl GrpcEvents {
    /// Handlers reading events from `store`.
    pub fn new(store: Store) -> Self {
        GrpcEvents { store }
    }
}

/// The tonic service to add to the hub's routes.
pub fn server(store: Store) -> EventServiceServer<GrpcEvents> {
    EventServiceServer::new(GrpcEvents::new(store))
}

/// The server stream of `EventService.Watch`.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<v1::Event, Status>> + Send>>;

#[tonic::async_trait]
impl EventService for GrpcEvents {
    type WatchStream = EventStream;

    #[tracing::instrument(skip_all, fields(since = %req.get_ref().since))]
    async fn watch(
        &self,
        req: Request<v1::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let since = &req.get_ref().since;
        let since = if since.is_empty() {
            None
        } else {
            Some(
                Cursor::parse(since)
                    .map_err(|e| Status::from(ServiceError::invalid("since", e.to_string())))?,
            )
        };
        let stream = events::watch(&self.store, since)
            .await
            .map_err(|e| Status::from(ServiceError::from(e)))?;
        Ok(Response::new(Box::pin(stream.map(|item| {
            item.map(v1::Event::from)
                .map_err(|e| Status::from(ServiceError::from(e)))
        }))))
    }
}
