{{/* The release's full name, at most 63 characters (a DNS label). */}}
{{- define "keyward.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels that select this release's pods; never change them after a release. */}}
{{- define "keyward.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "keyward.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "keyward.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "keyward.serviceAccountName" -}}
{{- default (include "keyward.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "keyward.operatorNamespace" -}}
{{- default .Release.Namespace .Values.operatorNamespace -}}
{{- end -}}

{{/* repository@digest when a digest is given, else repository:tag. */}}
{{- define "keyward.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The pods' affinity: the user's, else an anti-affinity that keeps replicas on
different nodes (preferred or required, per podAntiAffinity). */}}
{{- define "keyward.affinity" -}}
{{- if .Values.affinity -}}
{{ toYaml .Values.affinity }}
{{- else if eq .Values.podAntiAffinity "soft" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "keyward.selectorLabels" . | nindent 12 }}
{{- else if eq .Values.podAntiAffinity "hard" -}}
podAntiAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels:
          {{- include "keyward.selectorLabels" . | nindent 10 }}
{{- end -}}
{{- end -}}

{{/*
What the controllers do in every namespace they watch — the same rules for the
all-namespaces ClusterRole and for each namespaced Role (src/reconciler.rs):
- AuthKey / ServiceAccountKey: watched; the finalizer is added and removed with a patch;
  status written with patch_status; `/finalizers` update because the Secret's owner
  reference sets blockOwnerDeletion (OwnerReferencesPermissionEnforcement checks it).
- KeyProvider: watched (policy changes re-reconcile keys); status for the provider
  status controller.
- Secrets: the key's Secret is watched (label keyward.dev/managed-by), written with
  server-side apply, deleted with the key; credential Secrets of KeyProviders are read.
- Events: the recorder writes events.k8s.io/v1 Events and patches repeated ones; the
  same verbs on core Events, for a recorder that writes the core API.
*/}}
{{- define "keyward.namespacedRules" -}}
- apiGroups: ["keyward.dev"]
  resources: ["authkeys", "serviceaccountkeys"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["keyward.dev"]
  resources: ["authkeys/status", "serviceaccountkeys/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["keyward.dev"]
  resources: ["authkeys/finalizers", "serviceaccountkeys/finalizers"]
  verbs: ["update"]
- apiGroups: ["keyward.dev"]
  resources: ["keyproviders"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["keyward.dev"]
  resources: ["keyproviders/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# spec.rollout: watched for their rollout status, patched with one Pod-template
# annotation per new key (docs/workloads.md).
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets", "daemonsets"]
  verbs: ["get", "list", "watch", "patch"]
{{- end -}}

{{/* The operator's ServiceAccount as an RBAC subject. */}}
{{- define "keyward.subject" -}}
- kind: ServiceAccount
  name: {{ include "keyward.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- end -}}
