# The app's settings that are secret, one Secrets Manager secret per key of the Kubernetes Secret
# vurksha-secrets (k8s/README.md), named <name>/<KEY>. Terraform writes the values it knows
# (DATABASE_URL, REDIS_URL); the others are created empty and filled in by the operator, so that
# keys and third-party credentials never pass through Terraform's state.

locals {
  generated_secrets = {
    DATABASE_URL = "postgresql://${local.db_username}:${random_password.db.result}@${aws_db_instance.main.address}:${aws_db_instance.main.port}/${local.db_name}?ssl=require"
    # The default user with the AUTH token, over TLS.
    REDIS_URL = "rediss://:${random_password.redis.result}@${aws_elasticache_replication_group.main.primary_endpoint_address}:6379/0"
  }
  # Set by the operator (k8s/README.md says how each is made); the unit test keeps this list
  # equal to the keys of vurksha-secrets that k8s/rayservice.yaml reads.
  operator_secrets = [
    "VURKSHA_OTP_PEPPER",
    "VURKSHA_CURSOR_SECRET",
    "VURKSHA_JWT_PRIVATE_KEY",
    "VURKSHA_SMS_ACCOUNT_SID",
    "VURKSHA_SMS_AUTH_TOKEN",
    "VURKSHA_ADMIN_PHONE",
    "VURKSHA_RAZORPAY_KEY_ID",
    "VURKSHA_RAZORPAY_KEY_SECRET",
    "VURKSHA_RAZORPAY_WEBHOOK_SECRET",
    "VURKSHA_FCM_SERVICE_ACCOUNT",
    "VURKSHA_SMTP_HOST",
    "VURKSHA_SMTP_USERNAME",
    "VURKSHA_SMTP_PASSWORD",
  ]
}

resource "aws_secretsmanager_secret" "app" {
  # checkov:skip=CKV2_AWS_57:rotation needs a Lambda that can change each credential at its source (Razorpay, FCM, SMS, SMTP keys are rotated there); DB and Redis passwords are rotated by replacing their random_password (k8s/terraform/README.md)
  for_each = toset(concat(keys(local.generated_secrets), local.operator_secrets))

  name       = "${var.name}/${each.key}"
  kms_key_id = aws_kms_key.main.arn
  # 0 lets dev re-create a secret of the same name straight away after a destroy.
  recovery_window_in_days = var.deletion_protection ? 30 : 0
}

resource "aws_secretsmanager_secret_version" "generated" {
  for_each = local.generated_secrets

  secret_id     = aws_secretsmanager_secret.app[each.key].id
  secret_string = each.value
}
