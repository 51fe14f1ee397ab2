//! Leader election for coordinators sharing one etcd: each campaigns under
//! `<prefix>leader` with a lease; the one elected serves, the others wait. The leader keeps its
//! lease alive; when it cannot (etcd unreachable, process paused past the TTL), [`Leadership`]
//! reports the loss and the coordinator must stop serving at once, since another one may
//! already lead. A leader that dies simply stops renewing its lease, and a standby takes over
//! after the TTL.

use std::time::Duration;

use etcd_client::{Client, LeaderKey, ResignOptions};
use tokio::sync::watch;

use crate::error::{Error, Result};

/// Held while this process leads. Dropping it stops renewing the lease (the others take over
/// after the TTL); [`Leadership::resign`] hands over at once.
pub struct Leadership {
    client: Client,
    leader: Option<LeaderKey>,
    lease: i64,
    lost: watch::Receiver<bool>,
    keeper: tokio::task::JoinHandle<()>,
}

/// Campaigns for leadership under `name`, announcing `value` (the address this coordinator
/// will serve on); resolves once elected.
pub async fn campaign(
    client: &Client,
    name: &str,
    value: &str,
    ttl: Duration,
) -> Result<Leadership> {
    let mut client = client.clone();
    let ttl_secs = ttl.as_secs().max(2) as i64;
    let lease = client.lease_grant(ttl_secs, None).await?.id();
    let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
    let (lost_tx, lost) = watch::channel(false);
    // Renew from the start: a campaign can wait for a long time.
    let period = Duration::from_secs((ttl_secs as u64 / 3).max(1));
    let keeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let renewed = match keeper.keep_alive().await {
                Ok(()) => matches!(responses.message().await, Ok(Some(r)) if r.ttl() > 0),
                Err(_) => false,
            };
            if !renewed {
                tracing::error!(lease, "cannot renew the leadership lease");
                let _ = lost_tx.send(true);
                return;
            }
        }
    });
    tracing::info!(name, "campaigning for leadership");
    let mut leadership = Leadership {
        client: client.clone(),
        leader: None,
        lease,
        lost,
        keeper,
    };
    let mut response = client.campaign(name, value, lease).await?;
    leadership.leader = response.take_leader();
    if leadership.leader.is_none() {
        return Err(Error::Election(
            "etcd elected this coordinator without a leader key".into(),
        ));
    }
    tracing::info!(name, "elected leader");
    Ok(leadership)
}

impl Leadership {
    /// The election key and its create revision: writes conditional on them fail once this
    /// leadership is gone ([`crate::store::EtcdStore::fenced`]).
    pub fn fence(&self) -> Option<(Vec<u8>, i64)> {
        self.leader.as_ref().map(|l| (l.key().to_vec(), l.rev()))
    }

    /// Resolves when the lease could not be renewed: stop serving.
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|lost| *lost).await;
    }

    /// Gives up leadership now so a standby takes over without waiting for the TTL.
    pub async fn resign(mut self) {
        self.keeper.abort();
        if let Some(leader) = self.leader.take() {
            let options = ResignOptions::new().with_leader(leader);
            if let Err(e) = self.client.resign(Some(options)).await {
                tracing::warn!(error = %e, "resigning leadership failed");
            }
        }
        if let Err(e) = self.client.lease_revoke(self.lease).await {
            tracing::warn!(error = %e, "revoking the leadership lease failed");
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}
