# payretry's retry queue on Amazon SQS (DESIGN.md §5, PAYRETRY_QUEUE=sqs).
#
# Declares what `payretry sqs setup` creates, for environments managed with Terraform:
#   payments-retry-${var.env}      the standard queue the outbox relay sends to and the
#                                  workers long-poll (visibility timeout 60 s = the worker's
#                                  lease, which it extends while a provider call is slow)
#   payments-retry-${var.env}-dlq  where the redrive policy moves a message after
#                                  var.max_receives receives (14-day retention); the worker
#                                  drains it into payretry's own dead letters
# and a least-privilege IAM policy for the service: only the six SQS actions it calls, on
# only these two queues. Attach it to the role of every payretry process (api and worker).
#
# Keep var.max_receives equal to the service's PAYRETRY_MAX_RECEIVES and var.env equal to
# PAYRETRY_ENV: the service finds the queues by name.

terraform {
  required_version = ">= 1.3"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0"
    }
  }
}

variable "env" {
  description = "Environment name; the queue-name suffix. Must equal the service's PAYRETRY_ENV."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9_-]{1,40}$", var.env))
    error_message = "env must be 1 to 40 letters, digits, `-` or `_` (what PAYRETRY_ENV accepts)."
  }
}

variable "max_receives" {
  description = "Receives of one message before SQS moves it to the dead-letter queue. Must equal PAYRETRY_MAX_RECEIVES."
  type        = number
  default     = 5

  validation {
    condition     = var.max_receives >= 1 && var.max_receives <= 1000 && floor(var.max_receives) == var.max_receives
    error_message = "max_receives must be a whole number from 1 to 1000 (SQS's maxReceiveCount range)."
  }
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}

locals {
  queue_name = "payments-retry-${var.env}"
  tags = merge(
    {
      service = "payretry"
      env     = var.env
    },
    var.tags,
  )
}

resource "aws_sqs_queue" "payments_retry_dlq" {
  name                      = "${local.queue_name}-dlq"
  message_retention_seconds = 1209600 # 14 days, SQS's maximum
  sqs_managed_sse_enabled   = true
  tags                      = local.tags
}

resource "aws_sqs_queue" "payments_retry" {
  name                       = local.queue_name
  visibility_timeout_seconds = 60
  sqs_managed_sse_enabled    = true
  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.payments_retry_dlq.arn
    maxReceiveCount     = var.max_receives
  })
  tags = local.tags
}

data "aws_iam_policy_document" "payretry_sqs" {
  statement {
    sid    = "PayretryRetryQueues"
    effect = "Allow"
    actions = [
      "sqs:SendMessage",
      "sqs:ReceiveMessage",
      "sqs:DeleteMessage",
      "sqs:ChangeMessageVisibility",
      "sqs:GetQueueAttributes",
      "sqs:GetQueueUrl",
    ]
    resources = [
      aws_sqs_queue.payments_retry.arn,
      aws_sqs_queue.payments_retry_dlq.arn,
    ]
  }
}

resource "aws_iam_policy" "payretry_sqs" {
  name        = "payretry-sqs-${var.env}"
  description = "payretry (${var.env}): send, receive, delete and re-time messages on its retry queue and dead-letter queue; nothing else."
  policy      = data.aws_iam_policy_document.payretry_sqs.json
  tags        = local.tags
}

output "queue_url" {
  description = "URL of payments-retry-<env>."
  value       = aws_sqs_queue.payments_retry.id
}

output "queue_arn" {
  description = "ARN of payments-retry-<env>."
  value       = aws_sqs_queue.payments_retry.arn
}

output "dead_letter_queue_url" {
  description = "URL of payments-retry-<env>-dlq."
  value       = aws_sqs_queue.payments_retry_dlq.id
}

output "dead_letter_queue_arn" {
  description = "ARN of payments-retry-<env>-dlq."
  value       = aws_sqs_queue.payments_retry_dlq.arn
}

output "iam_policy_arn" {
  description = "ARN of the least-privilege policy to attach to the service's role."
  value       = aws_iam_policy.payretry_sqs.arn
}
