# Vurksha on AWS: a VPC, EKS with the KubeRay operator, RDS PostgreSQL, ElastiCache Redis and the
# app's secrets in Secrets Manager. Plain aws_* resources (no registry modules): nothing is
# downloaded at plan time beyond the providers, and checkov sees every resource.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

# The region's zones a, b and c by name (never Local or Wavelength Zones, which have no RDS or
# ElastiCache): a fixed set, so a zone AWS adds later never moves a subnet.
data "aws_availability_zones" "available" {
  state = "available"

  filter {
    name   = "zone-name"
    values = [for letter in ["a", "b", "c"] : "${var.region}${letter}"]
  }
}

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  azs        = slice(data.aws_availability_zones.available.names, 0, var.az_count)

  # The release of the CRDs vendored in k8s/crds (see k8s/crds/SOURCE.md): the manifests are
  # validated against them, so the operator must be the same release. The unit test checks it.
  kuberay_version = "1.7.0"

  # CloudWatch log groups, created here (not by the services on first write) so that each is
  # KMS-encrypted and expires. A year: audit and flow logs are what an incident review needs.
  log_retention_days = 365
  log_groups         = {
    flow_logs = "/aws/vpc/${var.name}/flow-logs"
    eks       = "/aws/eks/${var.name}/cluster" # the name EKS writes to
    postgres  = "/aws/rds/instance/${var.name}/postgresql"
    upgrade   = "/aws/rds/instance/${var.name}/upgrade"
    redis     = "/aws/elasticache/${var.name}/slow-log"
  }
}

# One customer-managed key per environment for everything at rest: EKS secrets, RDS storage and
# Performance Insights, ElastiCache, Secrets Manager and the log groups.
resource "aws_kms_key" "main" {
  description             = "${var.name}: EKS secrets, RDS, ElastiCache, Secrets Manager, logs"
  enable_key_rotation     = true
  deletion_window_in_days = 30

  # A key policy's Resource is always "*" (the key itself). The account statement lets IAM
  # policies grant use of the key (the services use it on the caller's behalf through grants);
  # CloudWatch Logs has no such path and needs its own statement, narrowed to this account's
  # log groups.
  policy = jsonencode({
    Version   = "2012-10-17"
    Statement = [
      {
        Sid       = "AccountAdministersThroughIAM"
        Effect    = "Allow"
        Principal = { AWS = "arn:${local.partition}:iam::${local.account_id}:root" }
        Action    = "kms:*"
        Resource  = "*"
      },
      {
        Sid       = "CloudWatchLogs"
        Effect    = "Allow"
        Principal = { Service = "logs.${var.region}.amazonaws.com" }
        Action    = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
        Resource  = "*"
        Condition = {
          ArnLike = {
            "kms:EncryptionContext:aws:logs:arn" = "arn:${local.partition}:logs:${var.region}:${local.account_id}:log-group:*"
          }
        }
      },
    ]
  })
}

resource "aws_kms_alias" "main" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.main.key_id
}

resource "aws_cloudwatch_log_group" "main" {
  for_each = local.log_groups

  name              = each.value
  retention_in_days = local.log_retention_days
  kms_key_id        = aws_kms_key.main.arn
}
