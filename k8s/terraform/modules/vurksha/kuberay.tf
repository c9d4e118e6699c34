# The KubeRay operator (it installs the ray.io CRDs) and the app's namespace. Both go through the
# helm and kubernetes providers that the root module points at this cluster.

resource "helm_release" "kuberay_operator" {
  name             = "kuberay-operator"
  repository       = "https://ray-project.github.io/kuberay-helm/"
  chart            = "kuberay-operator"
  version          = local.kuberay_version
  namespace        = "kuberay-system"
  create_namespace = true
  atomic           = true # a failed install or upgrade is rolled back, not left half-done

  # The operator's pod needs a node to become ready.
  depends_on = [aws_eks_node_group.main]
}

resource "kubernetes_namespace_v1" "app" {
  metadata {
    # The namespace k8s/overlays/<environment> deploys into.
    name = "vurksha-${var.environment}"
    labels = {
      "app.kubernetes.io/part-of" = "vurksha"
      environment                 = var.environment
      # Enforce "baseline"; "restricted" only warns, since KubeRay injects containers (the
      # autoscaler sidecar) whose security context is not ours to set.
      "pod-security.kubernetes.io/enforce" = "baseline"
      "pod-security.kubernetes.io/warn"    = "restricted"
    }
  }

  depends_on = [aws_eks_node_group.main]
}
