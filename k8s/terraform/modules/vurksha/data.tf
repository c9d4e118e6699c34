# RDS PostgreSQL and ElastiCache Redis in the private subnets, reachable only from the EKS cluster
# security group (the nodes, and the pods on them).

locals {
  eks_security_group_id = aws_eks_cluster.main.vpc_config[0].cluster_security_group_id
  db_name               = "vurksha"
  db_username           = "vurksha"
}

# Letters and digits only: the passwords go into URLs (DATABASE_URL, REDIS_URL) unescaped, and
# RDS and ElastiCache each refuse some punctuation. 48 alphanumerics are ~285 bits.
resource "random_password" "db" {
  length  = 48
  special = false
}

resource "random_password" "redis" {
  length  = 48
  special = false
}

# --- PostgreSQL ---

resource "aws_security_group" "db" {
  name_prefix = "${var.name}-db-"
  description = "PostgreSQL ${var.name}: from the EKS cluster security group only"
  vpc_id      = aws_vpc.main.id
  # No egress rules: Terraform drops the default allow-all, and the database starts no
  # connections of its own.

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "db_from_eks" {
  security_group_id            = aws_security_group.db.id
  referenced_security_group_id = local.eks_security_group_id
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
  description                  = "PostgreSQL from EKS nodes and pods"
}

resource "aws_db_subnet_group" "main" {
  name_prefix = "${var.name}-"
  subnet_ids  = aws_subnet.private[*].id
}

resource "aws_db_parameter_group" "postgres" {
  name_prefix = "${var.name}-postgres17-"
  family      = "postgres17"

  # TLS or nothing: a client that does not ask for it is refused (DATABASE_URL says ssl=require).
  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }
  # Schema changes and statements slower than half a second reach the log (CloudWatch).
  parameter {
    name  = "log_statement"
    value = "ddl"
  }
  parameter {
    name  = "log_min_duration_statement"
    value = "500"
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_iam_role" "rds_monitoring" {
  name_prefix        = "${var.name}-rds-monitoring-"
  assume_role_policy = data.aws_iam_policy_document.rds_monitoring_assume.json
}

data "aws_iam_policy_document" "rds_monitoring_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["monitoring.rds.amazonaws.com"]
    }
  }
}

resource "aws_iam_role_policy_attachment" "rds_monitoring" {
  role       = aws_iam_role.rds_monitoring.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}

resource "aws_db_instance" "main" {
  identifier     = var.name
  engine         = "postgres"
  engine_version = "17" # the newest 17.x; minor versions follow with auto_minor_version_upgrade
  instance_class = var.db_instance_class

  allocated_storage     = var.db_allocated_storage
  max_allocated_storage = var.db_max_allocated_storage
  storage_type          = "gp3"
  storage_encrypted     = true
  kms_key_id            = aws_kms_key.main.arn

  db_name  = local.db_name
  username = local.db_username
  password = random_password.db.result
  port     = 5432
  # The app connects with the password above; IAM authentication is on for people and tools
  # (rds-db:connect), so nobody else needs the password.
  iam_database_authentication_enabled = true

  db_subnet_group_name   = aws_db_subnet_group.main.name
  vpc_security_group_ids = [aws_security_group.db.id]
  publicly_accessible    = false
  ca_cert_identifier     = "rds-ca-rsa2048-g1"
  parameter_group_name   = aws_db_parameter_group.postgres.name

  # checkov:skip=CKV_AWS_157:multi_az is per environment: production sets it (tests/unit/test_terraform.py asserts so); dev and staging run one instance to save cost
  multi_az = var.multi_az
  # checkov:skip=CKV_AWS_293:deletion_protection is per environment: staging and production set it (asserted by the test); dev is torn down and rebuilt freely
  deletion_protection = var.deletion_protection

  # Automated backups with a retention are what point-in-time recovery restores from: any
  # second in the window (to about 5 minutes before now) can be restored to a new instance.
  backup_retention_period   = var.backup_retention_days
  backup_window             = "19:30-20:30" # UTC: 01:00-02:00 in India, the quietest hour
  maintenance_window        = "sun:21:00-sun:22:00"
  copy_tags_to_snapshot     = true
  delete_automated_backups  = !var.deletion_protection
  skip_final_snapshot       = !var.deletion_protection
  final_snapshot_identifier = var.deletion_protection ? "${var.name}-final" : null

  auto_minor_version_upgrade = true
  apply_immediately          = false

  performance_insights_enabled          = true
  performance_insights_kms_key_id       = aws_kms_key.main.arn
  performance_insights_retention_period = 7 # the free tier
  monitoring_interval                   = 60
  monitoring_role_arn                   = aws_iam_role.rds_monitoring.arn
  enabled_cloudwatch_logs_exports       = ["postgresql", "upgrade"]

  depends_on = [aws_cloudwatch_log_group.main, aws_iam_role_policy_attachment.rds_monitoring]
}

# --- Redis ---

resource "aws_security_group" "redis" {
  name_prefix = "${var.name}-redis-"
  description = "Redis ${var.name}: from the EKS cluster security group only"
  vpc_id      = aws_vpc.main.id

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "redis_from_eks" {
  security_group_id            = aws_security_group.redis.id
  referenced_security_group_id = local.eks_security_group_id
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6379
  description                  = "Redis from EKS nodes and pods"
}

resource "aws_elasticache_subnet_group" "main" {
  name       = var.name
  subnet_ids = aws_subnet.private[*].id
}

# Cluster mode off (one shard): the app uses database 0, pub/sub and multi-key commands.
resource "aws_elasticache_replication_group" "main" {
  replication_group_id = var.name
  description          = "Vurksha ${var.environment}: carts, pub/sub, rate limits"
  engine               = "redis"
  engine_version       = "7.1"
  parameter_group_name = "default.redis7"
  node_type            = var.redis_node_type
  port                 = 6379

  # A primary and a replica in another AZ that takes over on its own, or a single node.
  # checkov:skip=CKV2_AWS_50:automatic failover needs a replica, which multi_az adds: production sets it (tests/unit/test_terraform.py asserts so); dev and staging run one node to save cost
  num_cache_clusters         = var.multi_az ? 2 : 1
  automatic_failover_enabled = var.multi_az
  multi_az_enabled           = var.multi_az

  subnet_group_name  = aws_elasticache_subnet_group.main.name
  security_group_ids = [aws_security_group.redis.id]

  at_rest_encryption_enabled = true
  kms_key_id                 = aws_kms_key.main.arn
  transit_encryption_enabled = true # clients use rediss:// (REDIS_URL)
  auth_token                 = random_password.redis.result
  # A new token (replace random_password.redis) is added beside the old one, so pods still on
  # the old REDIS_URL keep working until they restart; see the README.
  auth_token_update_strategy = "ROTATE"

  snapshot_retention_limit   = var.backup_retention_days
  snapshot_window            = "20:30-21:30"
  maintenance_window         = "sun:22:00-sun:23:00"
  auto_minor_version_upgrade = true
  apply_immediately          = false

  log_delivery_configuration {
    destination      = aws_cloudwatch_log_group.main["redis"].name
    destination_type = "cloudwatch-logs"
    log_format       = "json"
    log_type         = "slow-log"
  }
}
