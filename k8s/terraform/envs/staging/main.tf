# The staging environment: one root module, its own state. The settings are in terraform.tfvars.

terraform {
  required_version = ">= 1.6, < 2.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 6.0"
    }
    helm = {
      source  = "hashicorp/helm"
      version = "~> 3.0"
    }
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = "~> 2.38"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.7"
    }
  }

  # State in S3 with a DynamoDB lock; bucket, key, region and table come from backend.hcl
  # (copy backend.hcl.example): terraform init -backend-config=backend.hcl
  backend "s3" {}
}

provider "aws" {
  region = var.region
  default_tags {
    tags = {
      Project     = "vurksha"
      Environment = "staging"
      ManagedBy   = "terraform"
    }
  }
}

# Both talk to the cluster as whoever runs terraform (a fresh token per call, no kubeconfig).
provider "kubernetes" {
  host                   = module.vurksha.cluster_endpoint
  cluster_ca_certificate = base64decode(module.vurksha.cluster_certificate_authority_data)
  exec {
    api_version = "client.authentication.k8s.io/v1beta1"
    command     = "aws"
    args        = ["eks", "get-token", "--region", var.region, "--cluster-name", module.vurksha.cluster_name]
  }
}

provider "helm" {
  kubernetes = {
    host                   = module.vurksha.cluster_endpoint
    cluster_ca_certificate = base64decode(module.vurksha.cluster_certificate_authority_data)
    exec                   = {
      api_version = "client.authentication.k8s.io/v1beta1"
      command     = "aws"
      args        = ["eks", "get-token", "--region", var.region, "--cluster-name", module.vurksha.cluster_name]
    }
  }
}

module "vurksha" {
  source = "../../modules/vurksha"

  environment              = "staging"
  region                   = var.region
  name                     = var.name
  vpc_cidr                 = var.vpc_cidr
  az_count                 = var.az_count
  api_public_access        = var.api_public_access
  api_public_cidrs         = var.api_public_cidrs
  node_instance_type       = var.node_instance_type
  node_min_size            = var.node_min_size
  node_desired_size        = var.node_desired_size
  node_max_size            = var.node_max_size
  db_instance_class        = var.db_instance_class
  db_allocated_storage     = var.db_allocated_storage
  db_max_allocated_storage = var.db_max_allocated_storage
  redis_node_type          = var.redis_node_type
  multi_az                 = var.multi_az
  deletion_protection      = var.deletion_protection
  backup_retention_days    = var.backup_retention_days
}
