# staging: production's shape at a smaller size, in one AZ for the database and Redis;
# protected from deletion, since it holds the data releases are rehearsed on.
region   = "ap-south-1"
name     = "vurksha-staging"
vpc_cidr = "10.20.0.0/16"
az_count = 3

# Private EKS API; see envs/dev/terraform.tfvars for opening it to one range for a run.
api_public_access = false
api_public_cidrs  = []

node_instance_type = "m6i.2xlarge"
node_min_size      = 2
node_desired_size  = 2
node_max_size      = 5

db_instance_class        = "db.m7g.large"
db_allocated_storage     = 50
db_max_allocated_storage = 200

redis_node_type = "cache.m7g.large"

multi_az              = false
deletion_protection   = true
backup_retention_days = 7
