# What the operator needs next (k8s/terraform/README.md); the same in every environment.

output "cluster_name" { value = module.vurksha.cluster_name }
output "kubeconfig_command" { value = module.vurksha.kubeconfig_command }
output "app_namespace" { value = module.vurksha.app_namespace }
output "kuberay_operator_version" { value = module.vurksha.kuberay_operator_version }
output "secret_arns" { value = module.vurksha.secret_arns }
output "secret_name_prefix" { value = module.vurksha.secret_name_prefix }
output "database_endpoint" { value = module.vurksha.database_endpoint }
output "redis_endpoint" { value = module.vurksha.redis_endpoint }
