# dev: small and cheap. One AZ for the database and one Redis node, one NAT gateway, nothing
# protected from deletion.
region   = "ap-south-1"
name     = "vurksha-dev"
vpc_cidr = "10.10.0.0/16"
az_count = 2 # EKS and the DB subnet group need two AZs even when RDS runs in one

# The EKS API is private (reachable from the VPC only). To run terraform/kubectl from a
# workstation, open it to your egress address for that run instead of committing it:
#   terraform apply -var api_public_access=true -var 'api_public_cidrs=["203.0.113.7/32"]'
api_public_access = false
api_public_cidrs  = []

# 8 vCPUs: the Ray head (2 CPUs) and one worker (4 CPUs) fit on one node.
node_instance_type = "m6i.2xlarge"
node_min_size      = 1
node_desired_size  = 1
node_max_size      = 3

db_instance_class        = "db.t4g.medium"
db_allocated_storage     = 20
db_max_allocated_storage = 100

redis_node_type = "cache.t4g.small"

multi_az              = false
deletion_protection   = false
backup_retention_days = 3
