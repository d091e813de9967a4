//! Merchant webhook deliveries for admins (DESIGN.md §3, §6b): listing them and queueing a
//! failed (or delivered) one again, with the same `webhook-id` and body.

use super::{Payments, ServiceError, ServiceResult};
use crate::storage::{DeliveryFilter, Page, Paged, Redelivery, WebhookDelivery};
use payretry_domain::{DeliveryId, Principal};

impl Payments {
    /// One page of deliveries matching `filter`, oldest first.
    pub async fn webhook_deliveries(
        &self,
        filter: &DeliveryFilter,
        page: Page,
    ) -> ServiceResult<Paged<WebhookDelivery>> {
        Ok(self.storage.webhook_deliveries(filter, page).await?)
    }

    /// Queues delivery `id` for one more try at once; a pending one is left as it is (it is
    /// queued already). Returns the delivery as it now stands.
    pub async fn redeliver_webhook(
        &self,
        id: DeliveryId,
        admin: &Principal,
    ) -> ServiceResult<WebhookDelivery> {
        match self.storage.redeliver_webhook(id).await? {
            Redelivery::NotFound => return Err(ServiceError::DeliveryNotFound),
            Redelivery::Queued => {
                tracing::info!(delivery = %id, actor = %admin.actor(), "webhook redelivery queued");
            }
            Redelivery::AlreadyPending => {}
        }
        self.storage
            .webhook_delivery(id)
            .await?
            .ok_or(ServiceError::DeliveryNotFound)
    }
}
