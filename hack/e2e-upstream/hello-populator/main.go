// hello-populator: the volume populator upstream's storage e2e suite deploys for "should
// provision storage with any volume data source" (testing-manifests/storage-csi/
// any-volume-datasource), written here because its module (and the library it uses,
// kubernetes-csi/lib-volume-populator) is not served by the Go module proxy this
// project builds from. Same command line and the same protocol as the original:
//
//	--mode=controller  watch claims whose dataSourceRef is a hello.example.com Hello; for
//	                   each, make a "prime" claim in --namespace with the same class, size,
//	                   access and volume mode (and selected node, for WaitForFirstConsumer),
//	                   run a pod (--image-name, --mode=populate) that writes the Hello's
//	                   file into it, then rebind the prime claim's PV to the user's claim
//	                   (claimRef and the populated-from annotation); once the PV
//	                   controller has bound the user's claim and marked the prime claim
//	                   Lost, delete the pod and the prime claim.
//	--mode=populate    write --file-contents to /mnt/<--file-name>.
//
// What it exercises in volplane: the provisioner leaves the user's claim to the populator,
// provisions the prime claim, and the PV controller follows the rebind (binds the user's
// claim, marks the prime claim Lost, keeps the PV when the prime claim goes).
package main

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
)

const (
	group          = "hello.example.com"
	kind           = "Hello"
	mountPath      = "/mnt/"
	populatedFrom  = group + "/populated-from"
	targetUIDLabel = group + "/target-uid"
	selectedNode   = "volume.kubernetes.io/selected-node"
	period         = 2 * time.Second
)

var hellos = schema.GroupVersionResource{Group: group, Version: "v1alpha1", Resource: "hellos"}

func main() {
	var mode, fileName, fileContents, httpEndpoint, master, kubeconfig, image, namespace string
	flag.StringVar(&mode, "mode", "", "controller or populate")
	flag.StringVar(&fileName, "file-name", "", "populate: the file to write under "+mountPath)
	flag.StringVar(&fileContents, "file-contents", "", "populate: what to write")
	flag.StringVar(&httpEndpoint, "http-endpoint", "", "controller: serve /healthz here")
	flag.StringVar(&master, "master", "", "API server address (default: in-cluster)")
	flag.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig (default: in-cluster)")
	flag.StringVar(&image, "image-name", "", "controller: the image populator pods run")
	flag.StringVar(&namespace, "namespace", "hello", "controller: where prime claims and pods live")
	klog.InitFlags(nil)
	flag.Parse()

	switch mode {
	case "populate":
		if fileName == "" || fileContents == "" {
			klog.Fatal("--file-name and --file-contents are required")
		}
		if err := os.WriteFile(mountPath+fileName, []byte(fileContents), 0o644); err != nil {
			klog.Fatalf("write %s: %v", mountPath+fileName, err)
		}
		klog.Infof("wrote %d bytes to %s", len(fileContents), mountPath+fileName)
	case "controller":
		if image == "" {
			klog.Fatal("--image-name is required")
		}
		cfg, err := clientcmd.BuildConfigFromFlags(master, kubeconfig)
		if err != nil {
			klog.Fatal(err)
		}
		if httpEndpoint != "" {
			go serveHealth(httpEndpoint)
		}
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
		defer stop()
		run(ctx, cfg, image, namespace)
	default:
		klog.Fatalf("unknown --mode %q (controller or populate)", mode)
	}
}

func serveHealth(addr string) {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	klog.Error(http.ListenAndServe(addr, mux))
}

type populator struct {
	kube      kubernetes.Interface
	dyn       dynamic.Interface
	image     string
	namespace string
}

func run(ctx context.Context, cfg *rest.Config, image, namespace string) {
	p := &populator{kube: kubernetes.NewForConfigOrDie(cfg), dyn: dynamic.NewForConfigOrDie(cfg),
		image: image, namespace: namespace}
	klog.Infof("populating %s.%s data sources; prime claims and pods in %q", kind, group, namespace)
	for {
		p.round(ctx)
		select {
		case <-ctx.Done():
			return
		case <-time.After(period):
		}
	}
}

// round: one level-triggered pass over every claim (a test populator: polling is enough).
func (p *populator) round(ctx context.Context) {
	claims, err := p.kube.CoreV1().PersistentVolumeClaims("").List(ctx, metav1.ListOptions{})
	if err != nil {
		klog.Errorf("list claims: %v", err)
		return
	}
	targets := map[types.UID]bool{}
	for i := range claims.Items {
		c := &claims.Items[i]
		ref := c.Spec.DataSourceRef
		if ref == nil || ref.Kind != kind || ref.APIGroup == nil || *ref.APIGroup != group {
			continue
		}
		targets[c.UID] = true
		if err := p.sync(ctx, c); err != nil {
			klog.Errorf("claim %s/%s: %v", c.Namespace, c.Name, err)
		}
	}
	p.collect(ctx, targets)
}

func primeName(c *corev1.PersistentVolumeClaim) string { return "prime-" + string(c.UID) }
func podName(c *corev1.PersistentVolumeClaim) string   { return "populate-" + string(c.UID) }

func (p *populator) sync(ctx context.Context, c *corev1.PersistentVolumeClaim) error {
	if c.Spec.VolumeName != "" {
		return p.cleanup(ctx, c.UID, primeName(c), podName(c)) // bound: populated
	}
	ns := c.Namespace
	if c.Spec.DataSourceRef.Namespace != nil && *c.Spec.DataSourceRef.Namespace != "" {
		ns = *c.Spec.DataSourceRef.Namespace
	}
	hello, err := p.dyn.Resource(hellos).Namespace(ns).Get(ctx, c.Spec.DataSourceRef.Name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("data source %s %s/%s: %w", kind, ns, c.Spec.DataSourceRef.Name, err)
	}
	file, _, _ := unstructuredString(hello.Object, "spec", "fileName")
	contents, _, _ := unstructuredString(hello.Object, "spec", "fileContents")
	if c.Spec.StorageClassName == nil || *c.Spec.StorageClassName == "" {
		return fmt.Errorf("no storage class: cannot make a prime claim")
	}
	sc, err := p.kube.StorageV1().StorageClasses().Get(ctx, *c.Spec.StorageClassName, metav1.GetOptions{})
	if err != nil {
		return err
	}
	node := ""
	if sc.VolumeBindingMode != nil && *sc.VolumeBindingMode == storagev1.VolumeBindingWaitForFirstConsumer {
		node = c.Annotations[selectedNode]
		if node == "" {
			return nil // the scheduler picks a node for the user's pod first
		}
	}

	prime, err := p.kube.CoreV1().PersistentVolumeClaims(p.namespace).Get(ctx, primeName(c), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		prime = &corev1.PersistentVolumeClaim{
			ObjectMeta: metav1.ObjectMeta{Name: primeName(c), Namespace: p.namespace,
				Labels: map[string]string{targetUIDLabel: string(c.UID)}},
			Spec: corev1.PersistentVolumeClaimSpec{
				AccessModes: c.Spec.AccessModes, Resources: c.Spec.Resources,
				StorageClassName: c.Spec.StorageClassName, VolumeMode: c.Spec.VolumeMode},
		}
		if node != "" {
			prime.Annotations = map[string]string{selectedNode: node}
		}
		if prime, err = p.kube.CoreV1().PersistentVolumeClaims(p.namespace).Create(ctx, prime, metav1.CreateOptions{}); err != nil {
			return err
		}
		klog.Infof("claim %s/%s: created prime claim %s/%s", c.Namespace, c.Name, p.namespace, prime.Name)
	} else if err != nil {
		return err
	}

	pod, err := p.kube.CoreV1().Pods(p.namespace).Get(ctx, podName(c), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		pod = &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: podName(c), Namespace: p.namespace,
				Labels: map[string]string{targetUIDLabel: string(c.UID)}},
			Spec: corev1.PodSpec{
				RestartPolicy: corev1.RestartPolicyNever,
				NodeName:      node,
				Containers: []corev1.Container{{
					Name: "populate", Image: p.image, ImagePullPolicy: corev1.PullIfNotPresent,
					Args:         []string{"--mode=populate", "--file-name=" + file, "--file-contents=" + contents},
					VolumeMounts: []corev1.VolumeMount{{Name: "target", MountPath: mountPath}},
				}},
				Volumes: []corev1.Volume{{Name: "target", VolumeSource: corev1.VolumeSource{
					PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: prime.Name}}}},
			},
		}
		_, err = p.kube.CoreV1().Pods(p.namespace).Create(ctx, pod, metav1.CreateOptions{})
		if err == nil {
			klog.Infof("claim %s/%s: started populator pod %s/%s", c.Namespace, c.Name, p.namespace, podName(c))
		}
		return err
	} else if err != nil {
		return err
	}
	switch pod.Status.Phase {
	case corev1.PodFailed:
		klog.Infof("populator pod %s failed; retrying", pod.Name)
		return p.kube.CoreV1().Pods(p.namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{})
	case corev1.PodSucceeded:
	default:
		return nil
	}

	if prime.Spec.VolumeName == "" {
		return nil
	}
	pv, err := p.kube.CoreV1().PersistentVolumes().Get(ctx, prime.Spec.VolumeName, metav1.GetOptions{})
	if err != nil {
		return err
	}
	ref := pv.Spec.ClaimRef
	if ref == nil || ref.UID != c.UID || ref.Namespace != c.Namespace || ref.Name != c.Name {
		patch := fmt.Sprintf(`{"metadata":{"annotations":{%q:%q}},"spec":{"claimRef":{"namespace":%q,"name":%q,"uid":%q,"resourceVersion":%q}}}`,
			populatedFrom, c.Namespace+"/"+c.Spec.DataSourceRef.Name, c.Namespace, c.Name, c.UID, c.ResourceVersion)
		if _, err := p.kube.CoreV1().PersistentVolumes().Patch(ctx, pv.Name, types.StrategicMergePatchType,
			[]byte(patch), metav1.PatchOptions{}); err != nil {
			return err
		}
		klog.Infof("claim %s/%s: rebound PV %s from the prime claim", c.Namespace, c.Name, pv.Name)
	}
	return nil // the PV controller binds the user's claim; cleanup once it is bound
}

// cleanup deletes the populator pod and, once the PV controller marked it Lost (its PV
// now belongs to the user's claim), the prime claim.
func (p *populator) cleanup(ctx context.Context, uid types.UID, prime, pod string) error {
	err := p.kube.CoreV1().Pods(p.namespace).Delete(ctx, pod, metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	c, err := p.kube.CoreV1().PersistentVolumeClaims(p.namespace).Get(ctx, prime, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	} else if err != nil {
		return err
	}
	if c.Status.Phase != corev1.ClaimLost && c.Spec.VolumeName != "" {
		return nil // the PV controller has not seen the rebind yet
	}
	err = p.kube.CoreV1().PersistentVolumeClaims(p.namespace).Delete(ctx, prime, metav1.DeleteOptions{})
	if err == nil {
		klog.Infof("deleted prime claim %s/%s (target uid %s)", p.namespace, prime, uid)
	}
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

// collect removes pods and prime claims whose user's claim is gone.
func (p *populator) collect(ctx context.Context, targets map[types.UID]bool) {
	claims, err := p.kube.CoreV1().PersistentVolumeClaims(p.namespace).List(ctx, metav1.ListOptions{LabelSelector: targetUIDLabel})
	if err != nil {
		return
	}
	for _, c := range claims.Items {
		uid := types.UID(c.Labels[targetUIDLabel])
		if !targets[uid] {
			_ = p.kube.CoreV1().Pods(p.namespace).Delete(ctx, "populate-"+string(uid), metav1.DeleteOptions{})
			_ = p.kube.CoreV1().PersistentVolumeClaims(p.namespace).Delete(ctx, c.Name, metav1.DeleteOptions{})
		}
	}
}

func unstructuredString(obj map[string]interface{}, path ...string) (string, bool, error) {
	var cur interface{} = obj
	for _, k := range path {
		m, ok := cur.(map[string]interface{})
		if !ok {
			return "", false, nil
		}
		cur = m[k]
	}
	s, ok := cur.(string)
	return s, ok, nil
}
