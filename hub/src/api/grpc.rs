//! The gRPC API (tonic): the four services of `berth.v1`, each method one call into [`Service`].

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::service::actions::Action;
use crate::service::migrations::{migration_to_proto, mode_from_proto, MigrateSpec};
use crate::service::view::health_from_proto;
use crate::service::{
    CreateContainer, RegisterNode, Service, UpdateContainer, HEARTBEAT_INTERVAL_SECS,
    STATUS_DELETING, STATUS_DEPLOYING, STATUS_SCALING,
};
use berth_proto::v1;
use berth_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use berth_proto::v1::container_service_server::{ContainerService, ContainerServiceServer};
use berth_proto::v1::migration_service_server::{MigrationService, MigrationServiceServer};
use berth_proto::v1::network_service_server::{NetworkService, NetworkServiceServer};
use berth_proto::v1::node_service_server::{NodeService, NodeServiceServer};

/// The gRPC services over one [`Service`].
#[derive(Debug, Clone)]
pub struct Grpc {
    service: Service,
}

impl Grpc {
    /// gRPC handlers over `service`.
    pub fn new(service: Service) -> Self {
        Grpc { service }
    }

    /// Stop, start or restart (all replicas, or the one named).
    async fn act(
        &self,
        r: &v1::LifecycleRequest,
        action: Action,
    ) -> GrpcResult<v1::LifecycleResponse> {
        let status = self
            .service
            .act(&r.container_id, Some(&r.instance_id), action)
            .await?;
        Ok(Response::new(v1::LifecycleResponse {
            status: status.to_owned(),
        }))
    }
}

/// A tonic router serving all four services.
pub fn routes(service: Service) -> tonic::service::Routes {
    let events = super::grpc_events::server(service.store().clone());
    let g = Grpc::new(service);
    tonic::service::Routes::new(NetworkServiceServer::new(g.clone()))
        .add_service(ContainerServiceServer::new(g.clone()))
        .add_service(NodeServiceServer::new(g.clone()))
        .add_service(MigrationServiceServer::new(g.clone()))
        .add_service(AgentServiceServer::new(g))
        .add_service(events)
}

type GrpcResult<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl NetworkService for Grpc {
    #[tracing::instrument(skip_all, fields(name = %req.get_ref().name))]
    async fn create_network(
        &self,
        req: Request<v1::CreateNetworkRequest>,
    ) -> GrpcResult<v1::Network> {
        let r = req.into_inner();
        Ok(Response::new(
            self.service
                .create_network(&r.name, &r.cidr, r.encrypted)
                .await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(network_id = %req.get_ref().network_id))]
    async fn get_network(&self, req: Request<v1::GetNetworkRequest>) -> GrpcResult<v1::Network> {
        Ok(Response::new(
            self.service.get_network(&req.get_ref().network_id).await?,
        ))
    }

    async fn list_networks(
        &self,
        _req: Request<v1::ListNetworksRequest>,
    ) -> GrpcResult<v1::ListNetworksResponse> {
        Ok(Response::new(v1::ListNetworksResponse {
            networks: self.service.list_networks().await?,
        }))
    }

    #[tracing::instrument(skip_all, fields(network_id = %req.get_ref().network_id))]
    async fn delete_network(
        &self,
        req: Request<v1::DeleteNetworkRequest>,
    ) -> GrpcResult<v1::DeleteNetworkResponse> {
        self.service
            .delete_network(&req.get_ref().network_id)
            .await?;
        Ok(Response::new(v1::DeleteNetworkResponse {}))
    }

    #[tracing::instrument(skip_all, fields(network_id = %req.get_ref().network_id))]
    async fn link_networks(
        &self,
        req: Request<v1::LinkNetworksRequest>,
    ) -> GrpcResult<v1::Network> {
        let r = req.get_ref();
        Ok(Response::new(
            self.service
                .link_networks(&r.network_id, &r.peer_network_id)
                .await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(network_id = %req.get_ref().network_id))]
    async fn unlink_networks(
        &self,
        req: Request<v1::UnlinkNetworksRequest>,
    ) -> GrpcResult<v1::Network> {
        let r = req.get_ref();
        Ok(Response::new(
            self.service
                .unlink_networks(&r.network_id, &r.peer_network_id)
                .await?,
        ))
    }
}

/// proto3 has no field presence: 0 replicas in a gRPC create means "not given" (1). Create with 1 and
/// scale to 0 to get none.
fn create_from_proto(r: v1::CreateContainerRequest) -> CreateContainer {
    CreateContainer {
        image: r.image,
        cpu: r.cpu,
        memory: r.memory,
        network_id: r.network_id,
        replicas: (r.replicas != 0).then_some(r.replicas),
        name: r.name,
        command: r.command,
        env: r.env.into_iter().collect(),
        restart_policy: r.restart_policy,
        max_restarts: (r.max_restarts != 0).then_some(r.max_restarts),
        health: r.health.as_ref().map(health_from_proto),
        stop_signal: r.stop_signal,
        stop_timeout: r.stop_timeout,
    }
}

#[tonic::async_trait]
impl ContainerService for Grpc {
    #[tracing::instrument(skip_all, fields(image = %req.get_ref().image))]
    async fn create_container(
        &self,
        req: Request<v1::CreateContainerRequest>,
    ) -> GrpcResult<v1::CreateContainerResponse> {
        let id = self
            .service
            .create_container(create_from_proto(req.into_inner()))
            .await?;
        Ok(Response::new(v1::CreateContainerResponse {
            container_id: id,
            status: STATUS_DEPLOYING.to_owned(),
        }))
    }

    #[tracing::instrument(skip_all, fields(container_id = %req.get_ref().container_id))]
    async fn get_container(
        &self,
        req: Request<v1::GetContainerRequest>,
    ) -> GrpcResult<v1::Container> {
        Ok(Response::new(
            self.service
                .get_container(&req.get_ref().container_id)
                .await?,
        ))
    }

    async fn list_containers(
        &self,
        _req: Request<v1::ListContainersRequest>,
    ) -> GrpcResult<v1::ListContainersResponse> {
        Ok(Response::new(v1::ListContainersResponse {
            containers: self.service.list_containers().await?,
        }))
    }

    #[tracing::instrument(skip_all, fields(container_id = %req.get_ref().container_id))]
    async fn scale_container(
        &self,
        req: Request<v1::ScaleContainerRequest>,
    ) -> GrpcResult<v1::ScaleContainerResponse> {
        let r = req.into_inner();
        self.service
            .scale_container(&r.container_id, r.replicas)
            .await?;
        Ok(Response::new(v1::ScaleContainerResponse {
            status: STATUS_SCALING.to_owned(),
        }))
    }

    #[tracing::instrument(skip_all, fields(container_id = %req.get_ref().container_id))]
    async fn delete_container(
        &self,
        req: Request<v1::DeleteContainerRequest>,
    ) -> GrpcResult<v1::DeleteContainerResponse> {
        self.service
            .delete_container(&req.get_ref().container_id)
            .await?;
        Ok(Response::new(v1::DeleteContainerResponse {
            status: STATUS_DELETING.to_owned(),
        }))
    }

    #[tracing::instrument(skip_all, fields(container_id = %req.get_ref().container_id))]
    async fn stop_container(
        &self,
        req: Request<v1::LifecycleRequest>,
    ) -> GrpcResult<v1::LifecycleResponse> {
        self.act(req.get_ref(), Action::Stop).await
    }

    #[tracing::instrument(skip_all, fields(container_id = %req.get_ref().container_id))]
    async fn start_container(
        &self,
        req: Request<v1::LifecycleRequest>,
    ) -> GrpcResult<v1::LifecycleResponse> {
        self.act(req.get_ref(), Action::Start).await
    }

    #[tracing::instrument(skip_all, fields(container_id = %req.get_ref().container_id))]
    async fn restart_container(
        &self,
        req: Request<v1::LifecycleRequest>,
    ) -> GrpcResult<v1::LifecycleResponse> {
        self.act(req.get_ref(), Action::Restart).await
    }

    #[tracing::instrument(skip_all, fields(container_id = %req.get_ref().container_id))]
    async fn update_container(
        &self,
        req: Request<v1::UpdateContainerRequest>,
    ) -> GrpcResult<v1::UpdateContainerResponse> {
        let r = req.into_inner();
        // proto3 strings have no presence: empty means "keep".
        let given = |s: String| (!s.is_empty()).then_some(s);
        let update = UpdateContainer {
            image: given(r.image),
            cpu: given(r.cpu),
            memory: given(r.memory),
            env: r.env.map(|e| e.env.into_iter().collect()),
            command: r.command.map(|c| c.command),
            max_unavailable: r.max_unavailable,
        };
        let (status, revision) = self
            .service
            .update_container(&r.container_id, update)
            .await?;
        Ok(Response::new(v1::UpdateContainerResponse {
            status: status.to_owned(),
            revision,
        }))
    }

    #[tracing::instrument(skip_all, fields(container_id = %req.get_ref().container_id))]
    async fn rollback_container(
        &self,
        req: Request<v1::RollbackContainerRequest>,
    ) -> GrpcResult<v1::UpdateContainerResponse> {
        let r = req.get_ref();
        let (status, revision) = self
            .service
            .rollback_container(&r.container_id, Some(r.revision))
            .await?;
        Ok(Response::new(v1::UpdateContainerResponse {
            status: status.to_owned(),
            revision,
        }))
    }

    #[tracing::instrument(skip_all, fields(container_id = %req.get_ref().container_id))]
    async fn list_revisions(
        &self,
        req: Request<v1::ListRevisionsRequest>,
    ) -> GrpcResult<v1::ListRevisionsResponse> {
        Ok(Response::new(v1::ListRevisionsResponse {
            revisions: self
                .service
                .list_revisions(&req.get_ref().container_id)
                .await?,
        }))
    }
}

#[tonic::async_trait]
impl NodeService for Grpc {
    async fn list_nodes(
        &self,
        _req: Request<v1::ListNodesRequest>,
    ) -> GrpcResult<v1::ListNodesResponse> {
        Ok(Response::new(v1::ListNodesResponse {
            nodes: self.service.list_nodes().await?,
        }))
    }

    #[tracing::instrument(skip_all, fields(node_id = %req.get_ref().node_id))]
    async fn get_node(&self, req: Request<v1::GetNodeRequest>) -> GrpcResult<v1::Node> {
        Ok(Response::new(
            self.service.get_node(&req.get_ref().node_id).await?,
        ))
    }

    #[tracing::instrument(skip_all,
        fields(node_id = %req.get_ref().node_id, live = req.get_ref().live))]
    async fn drain(&self, req: Request<v1::DrainNodeRequest>) -> GrpcResult<v1::DrainNodeResponse> {
        let r = req.get_ref();
        Ok(Response::new(
            self.service.drain_node(&r.node_id, r.live).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(node_id = %req.get_ref().node_id))]
    async fn uncordon(&self, req: Request<v1::UncordonNodeRequest>) -> GrpcResult<v1::Node> {
        Ok(Response::new(
            self.service.uncordon_node(&req.get_ref().node_id).await?,
        ))
    }
}

#[tonic::async_trait]
impl MigrationService for Grpc {
    #[tracing::instrument(skip_all, fields(container = %req.get_ref().container))]
    async fn migrate(&self, req: Request<v1::MigrateRequest>) -> GrpcResult<v1::Migration> {
        let r = req.into_inner();
        let job = self
            .service
            .migrate(MigrateSpec {
                container: r.container,
                instance_id: r.instance_id,
                target_node: r.target_node,
                mode: mode_from_proto(r.mode).to_owned(),
            })
            .await?;
        Ok(Response::new(migration_to_proto(&job)))
    }

    async fn get_migration(
        &self,
        req: Request<v1::GetMigrationRequest>,
    ) -> GrpcResult<v1::Migration> {
        let job = self
            .service
            .get_migration(&req.get_ref().migration_id)
            .await?;
        Ok(Response::new(migration_to_proto(&job)))
    }

    async fn list_migrations(
        &self,
        req: Request<v1::ListMigrationsRequest>,
    ) -> GrpcResult<v1::ListMigrationsResponse> {
        let jobs = self
            .service
            .list_migrations(&req.get_ref().container)
            .await?;
        Ok(Response::new(v1::ListMigrationsResponse {
            migrations: jobs.iter().map(migration_to_proto).collect(),
        }))
    }
}

/// The stream of desired states sent to an agent.
pub type DesiredStateStream = Pin<Box<dyn Stream<Item = Result<v1::DesiredState, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Grpc {
    #[tracing::instrument(skip_all, fields(node_id = %req.get_ref().node_id))]
    async fn register(
        &self,
        req: Request<v1::RegisterRequest>,
    ) -> GrpcResult<v1::RegisterResponse> {
        let r = req.into_inner();
        let cert = self
            .service
            .register_node(RegisterNode {
                node_id: r.node_id,
                hostname: r.hostname,
                advertise_ip: r.advertise_ip,
                cpu_millis: r.cpu_millis,
                memory_bytes: r.memory_bytes,
                wireguard_public_key: r.wireguard_public_key,
                api_addr: r.api_addr,
                csr_pem: r.csr_pem,
                migration_addr: r.migration_addr,
            })
            .await?;
        let (node_cert_pem, ca_cert_pem) = cert
            .map(|c| (c.cert_pem, c.ca_cert_pem))
            .unwrap_or_default();
        Ok(Response::new(v1::RegisterResponse {
            heartbeat_interval_secs: HEARTBEAT_INTERVAL_SECS,
            node_cert_pem,
            ca_cert_pem,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<v1::HeartbeatRequest>,
    ) -> GrpcResult<v1::HeartbeatResponse> {
        let known = self.service.heartbeat(&req.get_ref().node_id).await?;
        Ok(Response::new(v1::HeartbeatResponse { known }))
    }

    type WatchAssignmentsStream = DesiredStateStream;

    #[tracing::instrument(skip_all, fields(node_id = %req.get_ref().node_id))]
    async fn watch_assignments(
        &self,
        req: Request<v1::WatchAssignmentsRequest>,
    ) -> GrpcResult<Self::WatchAssignmentsStream> {
        let stream = self.service.watch_assignments(&req.get_ref().node_id)?;
        Ok(Response::new(Box::pin(
            stream.map(|item| item.map_err(Status::from)),
        )))
    }

    #[tracing::instrument(skip_all, fields(node_id = %req.get_ref().node_id))]
    async fn report_status(
        &self,
        req: Request<v1::ReportStatusRequest>,
    ) -> GrpcResult<v1::ReportStatusResponse> {
        let r = req.into_inner();
        self.service
            .report_status(&r.node_id, &r.reports, &r.removed)
            .await?;
        Ok(Response::new(v1::ReportStatusResponse {}))
    }
}
