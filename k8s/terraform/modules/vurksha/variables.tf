# The few settings that differ between environments; everything else is fixed in this module.

variable "environment" {
  description = "dev, staging or production (tags, and the namespace's labels)."
  type        = string

  validation {
    condition     = contains(["dev", "staging", "production"], var.environment)
    error_message = "environment must be dev, staging or production."
  }
}

variable "region" {
  description = "AWS region, e.g. ap-south-1 (used in the kubeconfig command and the KMS key policy)."
  type        = string
}

variable "name" {
  description = "Prefix of every resource and the EKS cluster's name, e.g. vurksha-dev."
  type        = string

  validation {
    # IAM name prefixes are the tightest (38 characters, and "-rds-monitoring-" is appended);
    # ElastiCache wants lowercase letters, digits and hyphens.
    condition     = can(regex("^[a-z][a-z0-9-]{1,18}[a-z0-9]$", var.name))
    error_message = "name must be 3-20 lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "vpc_cidr" {
  description = "The VPC's IPv4 range, a /16 (pods take their IPs from the private subnets)."
  type        = string
}

variable "az_count" {
  description = "Availability zones to spread the subnets over (EKS and RDS need at least 2)."
  type        = number

  validation {
    condition     = var.az_count >= 2 && var.az_count <= 3
    error_message = "az_count must be 2 or 3."
  }
}

# Two settings rather than "public when the list is non-empty": checkov cannot evaluate
# length(...) > 0 and would leave its public-endpoint check (CKV_AWS_39) unanswered.
variable "api_public_access" {
  description = "Open the EKS API to api_public_cidrs from the internet; false keeps it private (reachable from the VPC only)."
  type        = bool
  default     = false
}

variable "api_public_cidrs" {
  description = "With api_public_access, the CIDRs that may reach the EKS API (the operators' egress ranges)."
  type        = list(string)
  default     = []

  validation {
    condition     = !contains(var.api_public_cidrs, "0.0.0.0/0")
    error_message = "api_public_cidrs must not contain 0.0.0.0/0: list the operators' egress ranges."
  }
}

variable "node_instance_type" {
  description = "EC2 type of the EKS nodes. A Ray worker asks for 4 CPUs (k8s/rayservice.yaml), so 8 vCPUs is the smallest that takes one."
  type        = string
}

variable "node_min_size" {
  description = "Fewest nodes in the managed node group."
  type        = number
}

variable "node_desired_size" {
  description = "Nodes at creation (later left to a cluster autoscaler: changes are ignored)."
  type        = number
}

variable "node_max_size" {
  description = "Most nodes in the managed node group."
  type        = number
}

variable "db_instance_class" {
  description = "RDS instance class, e.g. db.t4g.medium."
  type        = string
}

variable "db_allocated_storage" {
  description = "Initial RDS storage in GiB."
  type        = number
}

variable "db_max_allocated_storage" {
  description = "Ceiling for RDS storage autoscaling in GiB."
  type        = number
}

variable "redis_node_type" {
  description = "ElastiCache node type, e.g. cache.t4g.small."
  type        = string
}

variable "multi_az" {
  description = "RDS standby in a second AZ, two Redis nodes with automatic failover, one NAT gateway per AZ."
  type        = bool
}

variable "deletion_protection" {
  description = "Refuse to delete the database, take a final snapshot when it is deleted, keep deleted secrets 30 days."
  type        = bool
}

variable "backup_retention_days" {
  description = "RDS automated backups (and so the point-in-time-recovery window) and Redis snapshots, in days (1-35)."
  type        = number

  validation {
    condition     = var.backup_retention_days >= 1 && var.backup_retention_days <= 35
    error_message = "backup_retention_days must be 1-35 (0 would turn point-in-time recovery off)."
  }
}
