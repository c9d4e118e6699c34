output "cluster_name" {
  description = "The EKS cluster."
  value       = aws_eks_cluster.main.name
}

output "cluster_endpoint" {
  description = "The EKS API endpoint (for the helm and kubernetes providers)."
  value       = aws_eks_cluster.main.endpoint
}

output "cluster_certificate_authority_data" {
  description = "The EKS API's CA certificate, base64."
  value       = aws_eks_cluster.main.certificate_authority[0].data
}

output "kubeconfig_command" {
  description = "Run this to point kubectl at the cluster."
  value       = "aws eks update-kubeconfig --region ${var.region} --name ${aws_eks_cluster.main.name}"
}

output "app_namespace" {
  description = "The namespace to apply k8s/ in."
  value       = kubernetes_namespace_v1.app.metadata[0].name
}

output "kuberay_operator_version" {
  description = "The KubeRay operator release installed."
  value       = helm_release.kuberay_operator.version
}

output "secret_arns" {
  description = "Secrets Manager ARN of each key of the Kubernetes Secret vurksha-secrets."
  value       = { for key, secret in aws_secretsmanager_secret.app : key => secret.arn }
}

output "secret_name_prefix" {
  description = "Each key's secret is named <prefix><KEY>."
  value       = "${var.name}/"
}

output "database_endpoint" {
  description = "PostgreSQL host:port (TLS required)."
  value       = aws_db_instance.main.endpoint
}

output "redis_endpoint" {
  description = "Redis primary endpoint host (TLS, AUTH token), port 6379."
  value       = aws_elasticache_replication_group.main.primary_endpoint_address
}

output "kms_key_arn" {
  description = "The key everything at rest is encrypted with."
  value       = aws_kms_key.main.arn
}
