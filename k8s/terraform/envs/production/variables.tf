# What an operator sets per environment (values in terraform.tfvars; descriptions in
# ../../modules/vurksha/variables.tf). No defaults: each environment states every one.
# The same in every environment (the unit test checks).

variable "region" { type = string }
variable "name" { type = string }
variable "vpc_cidr" { type = string }
variable "az_count" { type = number }
variable "api_public_access" { type = bool }
variable "api_public_cidrs" { type = list(string) }
variable "node_instance_type" { type = string }
variable "node_min_size" { type = number }
variable "node_desired_size" { type = number }
variable "node_max_size" { type = number }
variable "db_instance_class" { type = string }
variable "db_allocated_storage" { type = number }
variable "db_max_allocated_storage" { type = number }
variable "redis_node_type" { type = string }
variable "multi_az" { type = bool }
variable "deletion_protection" { type = bool }
variable "backup_retention_days" { type = number }
