# production: every AZ, a standby database and a Redis replica that take over on their own, a
# NAT gateway per AZ, deletion protection, 30 days of point-in-time recovery.
region   = "ap-south-1"
name     = "vurksha-production"
vpc_cidr = "10.30.0.0/16"
az_count = 3

# Private API only: run terraform and kubectl from inside the VPC (VPN, bastion, CI runner).
api_public_access = false
api_public_cidrs  = []

# 16 vCPUs: three 4-CPU Ray workers per node.
node_instance_type = "m6i.4xlarge"
node_min_size      = 3
node_desired_size  = 3
node_max_size      = 10

db_instance_class        = "db.r7g.xlarge"
db_allocated_storage     = 200
db_max_allocated_storage = 1000

redis_node_type = "cache.r7g.large"

multi_az              = true
deletion_protection   = true
backup_retention_days = 30
