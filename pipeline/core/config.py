"""Typed pipeline configuration: YAML file + ``--set`` overrides -> validated dataclasses.

Every section is a plain dataclass whose defaults follow the published recipes
(IRNet for the CAM network and thresholds, DeepLab for the segmentation network);
``configs/*.yaml`` only state what differs. Validation happens before any work, and
every problem is a one-line :class:`ConfigError` that names the offending key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "efficientnet_lite0", "efficientnet_lite1",
             "efficientnet_lite2")


BACKBONE_LEVELS = ("stem", "layer1", "layer2", "layer3", "layer4")  # the feature maps the backbone returns


MODES = ("weak", "full", "mixed")


def _opt(default, **checks):
    """A field with validation metadata: choices=, low=/high= (inclusive), above=/below= (exclusive)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: list(default) if isinstance(default, list) else dict(default),
                     metadata=checks)
    return field(default=default, metadata=checks)


@dataclass
class DataConfig:
    root: str = "data/VOC2012"  # relative paths are relative to the working directory
    train_split: str = "train"  # ImageSets/Segmentation/<split>.txt: the ids every network trains on
    # Folder (under root) of the train split's masks: image labels come from them, and full mode
    # trains on them.
    train_masks: str = "SegmentationClass"
    # Used instead, with SegmentationClass, when train_split's list or train_masks' folder is missing
    # (VOC: train_aug + SegmentationClassAug, else train); null: a missing one is an error.
    fallback_train_split: Optional[str] = None
    # Ids whose CAMs and pseudo masks are scored against SegmentationClass; null: the train split.
    # Must be among the train split's ids (VOC: the 1,464 train ids inside train_aug).
    score_split: Optional[str] = None
    # Image-level labels by class name, relative to root: a CSV (id,tags) or JSON ({id: [names]})
    # file (README "Your own data"). Without split files, its ids are the train split.
    tags: Optional[str] = None
    # Or IRNet's cls_labels.npy (relative to root): a pickle, so only read with allow_pickle: true.
    image_labels: Optional[str] = None
    # Lets image_labels read a pickle (.npy): unpickling can run code, so only for files you trust.
    allow_pickle: bool = False
    # ImageSets/Segmentation/<split>.txt: the held-out ids that seg predicts and is scored on
    # (never trained on); without split files (a tags file only) there are none.
    val_split: str = "val"
    # Medical stacks of 2-D slices: a regex whose match on an id (its group 1 if it has one)
    # names the id's 3-D volume; seg then also scores Dice and HD95 per volume (slices stacked
    # in the natural order of their ids). ACDC: '^(patient\d+_frame\d+)_slice_\d+$'.
    volume_pattern: Optional[str] = None
    # Voxel spacing of every volume, [between slices, rows, columns] in mm (HD95 in mm), or a CSV
    # (relative to root) with the header volume,slice,row,column; neither: HD95 in pixels.
    spacing: Optional[list[float]] = None
    spacing_file: Optional[str] = None  # the spacing CSV (see spacing), relative to root; not with spacing
    # DataLoader worker processes; 0 = load in the main process. Part of the cache key: workers
    # draw augmentations from their own seeds, so the trained model depends on it.
    loader_workers: int = _opt(0, low=0)


@dataclass
class DemoConfig:
    """Parameters of the generated demo data set (see pipeline/data/demo.py); changing any of
    them regenerates data.root."""
    num_train: int = _opt(400, low=1)  # images of the train split (train_0000, ...)
    num_val: int = _opt(100, low=1)  # images of the val split (val_0000, ...)
    min_size: int = _opt(96, low=16)  # each image's height and width are drawn from min_size..max_size px
    max_size: int = _opt(128, low=16)  # at least min_size
    seed: int = _opt(0, low=0, high=2**32 - 1)  # the data's own seed: the same keys, the same files


@dataclass
class BackboneConfig:
    name: str = _opt("resnet50", choices=BACKBONES)  # the feature extractor (docs/methods.md, "Backbones")
    # null: random initialisation; imagenet: the published ImageNet weights; or the path of a local state_dict
    weights: Optional[str] = None
    # Input size over the deepest feature map's size: 16 and 8 dilate the last levels instead of
    # striding them (a finer map, more compute); 32 is the plain network.
    output_stride: int = _opt(16, choices=(8, 16, 32))


@dataclass
class TrainConfig:
    epochs: int = _opt(5, low=1)  # passes over the training set
    # A budget in SGD steps instead (0: use epochs): rounded up to whole epochs over the data set.
    steps: int = _opt(0, low=0)
    batch_size: int = _opt(16, low=2)  # >= 2: BatchNorm needs more than one sample
    # adam: betas (momentum, 0.99), as the mixed-supervision authors
    optimizer: str = _opt("sgd", choices=("sgd", "adam"))
    # The backbone's learning rate (new layers: lr x head_lr_mult), decayed at every step by the
    # poly schedule lr * (1 - step / total_steps)^0.9 (pipeline/core/training.py).
    lr: float = _opt(0.01, low=0.0)
    head_lr_mult: float = _opt(10.0, low=0.0)  # new layers learn faster than a pretrained backbone
    momentum: float = _opt(0.9, low=0.0, high=1.0)  # SGD's momentum; adam: its first beta
    weight_decay: float = _opt(1e-4, low=0.0)  # the optimiser's L2 weight decay, on every parameter
    # Side of the square training crop, in pixels: each image is rescaled by a random factor
    # within scale_range, flipped left-right at random, padded where smaller than the crop
    # (mean colour, unlabelled), then cropped at a random position.
    crop_size: int = _opt(512, low=16)
    scale_range: list[float] = _opt([0.5, 1.5])  # random rescaling before the crop
    # Under torchrun: BatchNorm statistics over every process's share of the batch (SyncBatchNorm).
    sync_batchnorm: bool = False
    # Mixed precision: auto is bf16 autocast on a CUDA GPU that supports it, else fp16 with a
    # gradient scaler, and off on the CPU; or off, bf16, fp16 (CUDA only).
    amp: str = _opt("auto", choices=("auto", "off", "bf16", "fp16"))
    # Random brightness, contrast, saturation and hue of the image (torchvision's ColorJitter);
    # [] for none. PSA trains its AffinityNet with [0.3, 0.3, 0.3, 0.1] (train_aff.py:43-62).
    color_jitter: list[float] = _opt([])
    # A random rotation within +-rotation degrees, after the flip (bilinear for the image, the
    # nearest label for masks; corners filled with the mean colour, unlabelled); 0 for none.
    # The semi-supervised cardiac U-Nets rotate by up to 20 degrees (SSL4MIS dataloaders/dataset.py).
    rotation: float = _opt(0.0, low=0.0, high=180.0)


@dataclass
class SRConfig:
    """Self-Regulation losses (Zhang et al., ICCV 2021), training only; see
    pipeline/methods/self_regulation.py.
    Defaults are the authors' (dongzhang89/SR-SS@90a8e86 deeplab.py, trainval.py, losses.py)."""
    # false: exactly the baseline network and loss; true: the exits and SR's losses in training.
    enabled: bool = False
    # Levels that get an auxiliary exit (checked in config_from_dict); the main head is the
    # deepest exit. The authors': stem, layer1, layer2, layer3 (deeplab.py:43-46); an exit on
    # layer4 would duplicate the main head, which sits on it.
    exits: list[str] = _opt(list(BACKBONE_LEVELS[:-1]))
    # Exit segmenters' width: the authors' ClassLayer has 256 (deeplab.py:9-31); at stride 2 that
    # costs more than a small backbone itself, so the shipped configs set their own (docs/results.md,
    # "Self-Regulation: what it costs").
    head_channels: int = _opt(256, low=1)
    w_cls: float = _opt(0.2, low=0.0)  # Operation I, image-level BCE over exits
    # Operation I's image-level BCE of the main exit alone; null: w_cls like every other exit, as
    # the authors' (Lambda1 on every classifier, trainval.py:21,161,169). The authors' main path also
    # learns from its pixel loss (w_seg); a CAM network has none, so at 0.2 its own loss, the one
    # the CAMs come from, trains at a fifth of the baseline's rate. 1 keeps it at the baseline's.
    w_main_cls: Optional[float] = _opt(None, low=0.0)
    w_seg: float = _opt(0.8, low=0.0)  # Operation I, pixel cross-entropy over exits (seg stage only)
    w_sf: float = _opt(1.0, low=0.0)  # Operation II, shallow teacher -> deep students (details)
    w_sl: float = _opt(1.0, low=0.0)  # Operation III, deep teacher -> shallow students (context)
    # Operations II and III over their students: sum (the authors', losses.py:100-134) or mean.
    reduction: str = _opt("sum", choices=("sum", "mean"))
    # Where Operation II compares the maps: input (the authors': every exit upsampled to the
    # input size, deeplab.py:61-94) or teacher (the stride-2 teacher's own size, a quarter of the pixels).
    detail_resolution: str = _opt("input", choices=("input", "teacher"))
    # An exit's image-level logits: linear (the authors': GAP, then a linear layer) or pooled (the
    # GAP of each class's map is its logit, as for the main CAM; cam stage only, checked below).
    exit_classifier: str = _opt("linear", choices=("linear", "pooled"))
    form: str = _opt("hard", choices=("hard", "soft"))  # Operation II: hard targets or softened distributions
    # Operation II on CAMs (cam stage), hard form: none (every pixel, as the authors') or deep (only
    # inside the main CAM's own support, its pixels at or above its spatial mean: a teacher that
    # marks nothing of the class can then rearrange the CAM inside its support, not shrink it).
    detail_gate: str = _opt("none", choices=("none", "deep"))
    # What Operation II transfers (cam stage): classes (the exits' class maps, the authors') or
    # energy, class-agnostic: the channel-pooled activation energy of the shallowest exit level's
    # features is the target of every deeper exit level's and of the last level's, as attention
    # transfer (Zagoruyko and Komodakis, ICLR 2017), with no claim about classes.
    detail_target: str = _opt("classes", choices=("classes", "energy"))
    temperature: float = _opt(1.0, low=0.01)  # of the softmaxes of Operation II's soft form
    warmup_epochs: int = _opt(0, low=0)  # epochs with Operation I only


@dataclass
class ReCamConfig:
    """ReCAM (Chen et al., CVPR 2022): after its own training the CAM network trains a few more
    epochs with a softmax cross-entropy on each image class's CAM-weighted feature, through a
    second 1x1 classifier; the CAMs then come from the product of the two classifiers' weights.
    Defaults are the authors' (zhaozhengChen/ReCAM@2bdbcd2 run_sample.py:47-49,
    step/train_recam.py:64-95, net/resnet50_cam.py:76-100,134-173, step/make_recam.py:39).
    Batch, crop, rescaling and weight decay are cam.train's, as theirs are the CAM training's."""
    enabled: bool = False
    epochs: int = _opt(4, low=1)  # extra passes over the training set (the authors': 4)
    # The second classifier's learning rate; the CAM network itself (backbone and classifier)
    # learns at a tenth of it (train_recam.py:72-74), poly-decayed like every training here.
    lr: float = _opt(5e-4, low=0.0)
    # The authors' PolyOptimizer hands the weight decay to SGD in momentum's place
    # (misc/torchutils.py:11-12), so their ReCAM runs with momentum 1e-4.
    momentum: float = _opt(1e-4, low=0.0, high=1.0)
    loss_weight: float = _opt(1.0, low=0.0)  # of the softmax cross-entropy beside the multi-label loss


@dataclass
class AdvCamConfig:
    """AdvCAM (Lee, Kim & Yoon, CVPR 2021): at CAM time the image climbs, step by step, the
    gradient of its class's score against every other class's (anti-adversarial: the opposite of
    an attack), while the region the first CAM already calls the class (the mask) is held to its
    first value; the CAMs of every step are summed. The trained network is the same. Defaults are
    the authors' (jbeomlee93/AdvCAM@2650fcd obtain_CAM_masking.py:48-51,59-68,90-145). It costs
    a forward and backward pass per step, class and scale (docs/results.md, "AdvCAM's cost on
    2 cores")."""
    enabled: bool = False
    iterations: int = _opt(27, low=1)  # steps per class and scale (adv_iter); scales below 1 run about half
    # Each step: this times the gradient over its largest absolute value (AD_stepsize).
    step_size: float = _opt(0.08, above=0.0)
    mask_weight: float = _opt(7.0, low=0.0)  # of the change of the CAM inside the mask (AD_coeff)
    # The mask: where the CAM is above this share of its max (score_th).
    mask_threshold: float = _opt(0.5, low=0.0, high=1.0)


@dataclass
class CamConfig:
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(output_stride=16))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=0.01, crop_size=512))
    scales: list[float] = _opt([1.0, 0.5, 1.5, 2.0])  # multi-scale CAM inference
    flip: bool = True  # add the horizontally flipped image at every scale
    bg_threshold: float = _opt(0.15, low=0.0, high=1.0)  # CAM score below which a pixel is background
    sr: SRConfig = field(default_factory=SRConfig)
    # After the training (with or without SR): ReCAM's extra epochs, and the CAMs it defines.
    recam: ReCamConfig = field(default_factory=ReCamConfig)
    # How the CAMs are read from the trained network: AdvCAM's climb instead of one pass per scale.
    advcam: AdvCamConfig = field(default_factory=AdvCamConfig)


@dataclass
class CrfConfig:
    """Dense CRF (Kraehenbuehl & Koltun) on label maps; defaults from IRNet."""
    iterations: int = _opt(10, low=1)  # mean-field inference steps
    gt_prob: float = _opt(0.7, above=0.0, below=1.0)  # confidence given to the input labels
    gaussian_sxy: float = _opt(3.0, above=0.0)  # smoothness kernel: its width in pixels (positions only)
    gaussian_compat: float = _opt(3.0, low=0.0)  # smoothness kernel: its weight
    bilateral_sxy: float = _opt(50.0, above=0.0)  # appearance kernel: its width in pixels
    bilateral_srgb: float = _opt(5.0, above=0.0)  # appearance kernel: its width in colour (RGB, 0-255)
    bilateral_compat: float = _opt(10.0, low=0.0)  # appearance kernel: its weight


@dataclass
class AffinityNetConfig:
    """AffinityNet (Ahn & Kwak, CVPR 2018): pixel embeddings whose distances say which pixels
    belong together, learnt from the confident pixels of the CRF pseudo masks. Defaults are
    PSA's (jiwoon-ahn/psa@9493e59 train_aff.py:18-27, network/resnet38_aff.py)."""
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(output_stride=16))
    # PSA: batch 8, 8 epochs, lr 0.1 (new layers x10), weight decay 5e-4, crop 448, no rescale,
    # colour jitter. Its SGD gets the weight decay in momentum's place (tool/torchutils.py:12-16),
    # so it runs with momentum 5e-4: that is the default here too (docs/methods.md, "PSA's
    # AffinityNet and random walk (`refine.method: affinity`)").
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=8, batch_size=8, lr=0.1, momentum=5e-4, weight_decay=5e-4, crop_size=448,
        scale_range=[1.0, 1.0], color_jitter=[0.3, 0.3, 0.3, 0.1]))
    feature_stride: int = _opt(8, choices=(4, 8))  # of the embedding map the affinities live on (PSA: 8)
    embedding_channels: int = _opt(448, low=1)  # PSA: 448
    # psa: 1x1 convs without bias, ELU, kaiming init, and an ELU output layer with xavier gain 4
    # (resnet38_aff.py:13-22,38-41): the untrained affinities spread over 0-0.5, not all near 1;
    # bn_relu: 1x1 conv, BN, ReLU per level and a linear 1x1 output with default initialisation.
    head: str = _opt("psa", choices=("psa", "bn_relu"))
    # Where the pair labels come from. psa (psa@9493e59 infer_cls.py:88-107, voc12/data.py:
    # VOC12AffDataset): a CRF on the score maps [(1 - max CAM)^alpha, CAMs] for each of
    # label_powers (PSA's low_alpha 4 and high_alpha 32), with PSA's kernels (label_crf); a
    # class where the low-alpha CRF's argmax says so, background where the high-alpha one says
    # so (that wins), unsure elsewhere. thresholds: the CRF masks of refine's fg_threshold and
    # bg_threshold (refine.crf), as the crf method and IRNet make them.
    labels: str = _opt("psa", choices=("psa", "thresholds"))
    # labels psa: [low, high] powers of the background score (1 - max CAM)^power: strong at the
    # low one, weak at the high one (PSA's low_alpha, high_alpha).
    label_powers: list[float] = _opt([4.0, 32.0])
    label_crf: CrfConfig = field(default_factory=lambda: CrfConfig(bilateral_sxy=80.0, bilateral_srgb=13.0))
    # How the pseudo mask reaches the embedding map for the pair labels: pool (PSA: average
    # pooling, then the most frequent label) or nearest (one pixel per block).
    label_downsample: str = _opt("pool", choices=("pool", "nearest"))
    # Label pairs closer than this, in embedding-map pixels; 1 would leave no pair to learn from.
    radius: int = _opt(5, low=2)
    # PSA trains neither the BatchNorm layers of its backbone (eval mode, parameters fixed:
    # network/resnet38d.py:191-211) nor its first blocks (resnet38_aff.py:24: conv1a and b2, to
    # stride 4; here stem and layer1). For a backbone without pretrained weights, train them all
    # (false and []): random fixed features have nothing to say.
    freeze_batchnorm: bool = True
    frozen_levels: list[str] = _opt(["stem", "layer1"])  # backbone levels kept fixed; []: all train


@dataclass
class RandomWalkConfig:
    """Propagation of the CAMs along the learnt affinities (changing these never retrains the net).
    Defaults are PSA's (infer_aff.py:59-62: alpha 16, beta 8, logt 8, radius 5)."""
    # Transitions between pixels closer than this, in embedding-map pixels (1: no neighbour, no walk).
    radius: int = _opt(5, low=2)
    beta: float = _opt(8.0, above=0.0)  # affinities are raised to this power: sharper region borders
    iterations: int = _opt(256, low=1)  # t, the number of transition steps (PSA: 2^logt = 2^8)
    # psa: only the pairs PSA's index function makes (none start near the left, right and bottom
    # borders; pipeline/methods/affinity.py); all: every pair within the radius inside the image.
    pairs: str = _opt("psa", choices=("psa", "all"))
    # argmax (PSA): the background (1 - max CAM)^bg_power walks with the CAMs, and each pixel takes
    # the highest walked score: no unsure pixels. two_backgrounds: every walked map is divided by
    # its maximum; a pixel where a class wins against the strong background (1 - max CAM)^fg_bg_power
    # is that class, one where the weak (1 - max CAM)^bg_bg_power still wins is background, the
    # rest unsure (255), like refine's two thresholds.
    rule: str = _opt("argmax", choices=("argmax", "two_backgrounds"))
    bg_power: float = _opt(16.0, above=0.0)  # rule argmax: PSA's alpha
    fg_bg_power: float = _opt(1.0, above=0.0)  # rule two_backgrounds
    bg_bg_power: float = _opt(4.0, above=0.0)  # rule two_backgrounds
    crf: bool = False  # snap the final label map(s) to image edges with the dense CRF (refine.crf settings)


@dataclass
class IrnConfig:
    """IRNet's inter-pixel relations (Ahn, Cho & Kwak, CVPR 2019): a boundary map learnt from the
    pair labels of the CRF masks. Defaults are IRNet's (jiwoon-ahn/irn@a2ece00 run_sample.py:35-52,
    step/train_irn.py, net/resnet50_irn.py); the displacement branch, which serves instance
    masks only, is left out."""
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(output_stride=16))
    # IRNet: batch 32, 3 epochs, lr 0.1 for the boundary layers, weight decay 1e-4, crop 512,
    # rescale 0.5-1.5. Its backbone is frozen (features detached, BatchNorm fixed).
    # Its SGD, like PSA's, gets the weight decay in momentum's place (misc/torchutils.py:11-12).
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=3, batch_size=32, lr=0.1, head_lr_mult=1.0, momentum=1e-4, weight_decay=1e-4, crop_size=512,
        scale_range=[0.5, 1.5]))
    # false trains the backbone too: for a backbone without pretrained weights, whose frozen
    # random features have little to say about boundaries (not IRNet's setting).
    freeze_backbone: bool = True
    radius: int = _opt(10, low=2)  # pairs of the training loss, in stride-4 pixels (train_irn.py:140)
    label_downsample: str = _opt("nearest", choices=("pool", "nearest"))  # IRNet: nearest (dataloader.py:269)


@dataclass
class IrnWalkConfig:
    """IRNet's walk (make_sem_seg_labels.py:37-49, misc/indexing.py:141-167): the CAMs, times
    (1 - boundary), walked along 1 - (the highest boundary value between two pixels), then
    divided by their overall maximum; a pixel is background where no class reaches ``bg_threshold``."""
    # Transitions between pixels closer than this, in pixels of the stride-4 boundary map.
    radius: int = _opt(5, low=2)
    beta: float = _opt(10.0, above=0.0)  # the path affinities are raised to this power
    iterations: int = _opt(256, low=1)  # IRNet: exp_times 8, 2^8 steps
    # The constant background score set against the walked CAMs (divided by their maximum):
    # background where no class reaches it (IRNet's sem_seg_bg_thres).
    bg_threshold: float = _opt(0.25, low=0.0, high=1.0)


@dataclass
class RegionsConfig:
    """Region snapping after any refine method (pipeline/methods/regions.py): each final pseudo
    mask is voted within the image's Felzenszwalb & Huttenlocher regions (IJCV 2004). Defaults
    are theirs, not tuned on our masks: sigma 0.8 ("we always use"), k 300 (their examples at
    about 320x240 px); min_size is scikit-image's default."""
    enabled: bool = False
    scale: float = _opt(300.0, above=0.0)  # k: larger gives larger regions (the colour step a region absorbs)
    sigma: float = _opt(0.8, low=0.0)  # the Gaussian smoothing before the edge weights, in pixels
    min_size: int = _opt(20, low=1)  # smaller regions are merged into a neighbour, in pixels


@dataclass
class RefineConfig:
    # crf: the CRF pseudo masks are final; affinity: they train an AffinityNet, and a random
    # walk along its affinities turns the CAMs into the final pseudo masks; irn: the same with
    # IRNet's boundary map and walk.
    method: str = _opt("crf", choices=("crf", "affinity", "irn"))
    # IRNet's two thresholds: a pixel is confidently foreground when the CRF keeps it
    # foreground even against a high background score, confidently background when the
    # CRF calls it background even against a low one; everything between is unsure (255).
    fg_threshold: float = _opt(0.30, low=0.0, high=1.0)
    bg_threshold: float = _opt(0.05, low=0.0, high=1.0)  # the low background score (see fg_threshold)
    # fixed: the two thresholds above (IRNet's conf_fg_thres, conf_bg_thres). otsu, yen: both come
    # from the train CAMs, with no masks: Otsu's or Yen's threshold of every pixel's highest CAM,
    # then Otsu's threshold of the pixels below it (pipeline/methods/cams.py, cam_thresholds); the
    # two keys above then stand in only where the CAMs leave nothing to split (no tagged image).
    thresholds: str = _opt("fixed", choices=("fixed", "otsu", "yen"))
    crf: CrfConfig = field(default_factory=CrfConfig)
    affinity: AffinityNetConfig = field(default_factory=AffinityNetConfig)
    random_walk: RandomWalkConfig = field(default_factory=RandomWalkConfig)
    irn: IrnConfig = field(default_factory=IrnConfig)
    irn_walk: IrnWalkConfig = field(default_factory=IrnWalkConfig)
    regions: RegionsConfig = field(default_factory=RegionsConfig)
    workers: int = _opt(2, low=1)  # CRF worker processes


@dataclass
class SelfTrainingConfig:
    """Weak mode only: after seg has trained on refine's pseudo masks, its own predictions on the
    train images become the next pseudo masks and a fresh network trains on them, ``rounds``
    times (pipeline/methods/self_training.py)."""
    enabled: bool = False
    rounds: int = _opt(1, low=1)  # networks trained after the first, each on the previous one's masks
    # The predictions' softmax, restricted to the background and the image's tags, through the
    # dense CRF with refine.crf's kernels before the argmax (false: the argmax alone).
    crf: bool = True


@dataclass
class SegConfig:
    backbone: BackboneConfig = field(
        default_factory=lambda: BackboneConfig(name="resnet101", output_stride=16))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20, lr=0.007, crop_size=512))
    # aspp: DeepLab-v3's head on the deepest level; unet: a decoder with skips from every level,
    # predicting at stride 2 (thin structures: the myocardium ring); mixed mode's two branches both use it.
    decoder: str = _opt("aspp", choices=("aspp", "unet"))
    aspp_rates: list[int] = _opt([6, 12, 18])  # at output stride 16; double them at stride 8
    flip_predict: bool = True  # average the prediction with that of the flipped image
    # The loss on pixel masks (full mode's, weak mode's pseudo masks, mixed mode's teacher):
    # cross_entropy_dice adds the soft Dice of the foreground classes to the cross-entropy, as
    # nnU-Net and the ACDC literature train (pipeline/methods/losses.py). Scribbles and SR's exits
    # keep the cross-entropy.
    loss: str = _opt("cross_entropy", choices=("cross_entropy", "cross_entropy_dice"))
    # The predictions' softmax through the dense CRF with refine.crf's kernels (sized for the data
    # set's images; its gt_prob is unused), as DeepLab v1-v2 post-process; prediction time only.
    crf_predict: bool = False
    # Each predicted class keeps only its largest connected component, the rest turns background
    # (pipeline/methods/components.py): per 3-D volume where data.volume_pattern groups slices,
    # else per image. For one object per class (a heart's chambers); prediction time only, except
    # that with mixed.copy_paste it also cuts the EMA's pseudo masks (per image).
    largest_component: bool = False
    sr: SRConfig = field(default_factory=SRConfig)
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)


@dataclass
class CopyPasteConfig:
    """BCP's bidirectional copy-paste (Bai et al., CVPR 2023; DeepMed-Lab-ECNU/BCP@7879f98
    code/ACDC_BCP_train.py), not in the mixed-supervision paper: after the first ``start`` of the
    epochs, each step pastes a box of 2/3 of the crop's side between pairs of full and weak images,
    both ways, and the student also learns BCP's loss on them: the full masks where the full images
    are, the pseudo masks of an EMA of the network where the weak ones are, those weighted
    ``u_weight`` (pipeline/methods/mixed.py). In those steps the partial cross-entropy is pooled and
    the entropy covers every pixel, whatever mixed.partial_ce and entropy_on say. Needs
    mixed.weak_per_full 1, seg.sr.enabled false and a seg.train.batch_size that is a multiple of 4
    (two pairs at least in each process's share)."""
    enabled: bool = False  # true: BCP's steps after the first `start` of the epochs
    u_weight: float = _opt(0.5, low=0.0)  # the weak images' share of the loss (BCP's u_weight, line 48)
    ema: float = _opt(0.99, low=0.0, high=1.0)  # the pseudo-labelling EMA's decay (BCP's, line 390)
    # The share of the epochs before copy-paste starts, in which the mixed-supervision loss alone
    # trains the network that the EMA then starts from: BCP pre-trains for 10k of its 40k iterations.
    start: float = _opt(0.25, low=0.0, high=1.0)


@dataclass
class MixedConfig:
    """--mode mixed: a dual-branch teacher-student segmenter (Dolz, Desrosiers, Ben Ayed, IPMI 2021);
    see pipeline/methods/mixed.py. Defaults are the authors' code's."""
    # Share of the train split that keeps its full mask, picked by ``seed``; or the ids in full_list.
    full_fraction: float = _opt(0.1, above=0.0, high=1.0)
    full_list: Optional[str] = None  # a file of ids, one per line (relative to the working directory)
    # The student's labels: pseudo (refine's pseudo masks), scribble (<data.root>/Scribbles/),
    # erode (each foreground region of the full mask eroded to a core of erode_keep of its pixels;
    # the background stays unlabelled, as in the authors' code).
    weak_source: str = _opt("pseudo", choices=("pseudo", "scribble", "erode"))
    # erode: the share of each region's pixels kept as its core, those farthest from its border.
    erode_keep: float = _opt(0.05, above=0.0, high=1.0)
    # true: the background gets an eroded core too (not the authors' protocol); where it is the
    # largest region, as on ACDC, it then holds most of the weak labels.
    erode_background: bool = False
    # The authors' main.py (josedolz/MSL-student-becomes-master @68b98c2) is the reference for
    # every default here: argparse defaults xtimes_weak 1, weight_KL 20, weight_Weakly 0.1,
    # weight_Entropy 1, temperature 2; the loss lines of runTraining for the rest.
    # Weak images per full image in a batch (xtimes_weak 1); 0: the full subset alone.
    weak_per_full: int = _opt(1, low=0)
    w_partial: float = _opt(0.1, low=0.0)  # lambda_w, the student's partial cross-entropy (weight_Weakly)
    w_kl: float = _opt(20.0, low=0.0)  # lambda_kl, KL(student || teacher) on the full images (weight_KL)
    w_entropy: float = _opt(1.0, low=0.0)  # lambda_ent, the student's entropy (weight_Entropy); 0: "KL only"
    # all: the entropy of every student output in the batch, as their eloss, whose concatenation
    # holds each full image three times and each weak image once; weak: the weak images only.
    entropy_on: str = _opt("all", choices=("all", "weak"))
    # sum: the full images' and the weak images' partial cross-entropies, each averaged over its
    # own labelled pixels, then added (their my_partialCE_loss_F + my_partialCE_loss_W);
    # pooled: one average over every labelled pixel of the batch.
    partial_ce: str = _opt("sum", choices=("sum", "pooled"))
    temperature: float = _opt(2.0, above=0.0)  # the KL term's second softening, softmax(softmax(z) / T)
    # The authors' code lets the KL term's gradient reach the teacher; true stops it there.
    detach_teacher: bool = False
    # DMPLS's dynamically mixed pseudo labels (Luo et al., MICCAI 2022; HiLab-git/WSL4MIS), not in the
    # mixed-supervision paper: on the weak images, both branches learn the Dice loss against the
    # argmax of beta * student + (1 - beta) * teacher softmax, beta drawn anew each step; the weight
    # of that term (their 0.5); 0: off (pipeline/methods/mixed.py).
    w_dmpls: float = _opt(0.0, low=0.0)
    copy_paste: CopyPasteConfig = field(default_factory=CopyPasteConfig)


@dataclass
class Config:
    seed: int = _opt(0, low=0, high=2**32 - 1)  # NumPy seeds must fit in 32 bits
    # weak: seg learns from refine's pseudo masks (image labels only); full: from the ground-truth
    # masks (seg alone); mixed: a few full masks and weak labels (the mixed section). --mode sets it.
    mode: str = _opt("weak", choices=MODES)
    device: str = _opt("auto", choices=("auto", "cpu", "cuda"))  # auto: CUDA when available, else the CPU
    num_threads: int = _opt(0, low=0)  # torch CPU threads; 0 = torch's default
    data: DataConfig = field(default_factory=DataConfig)
    demo: Optional[DemoConfig] = None  # set: generate the demo data set into data.root
    cam: CamConfig = field(default_factory=CamConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    seg: SegConfig = field(default_factory=SegConfig)
    mixed: MixedConfig = field(default_factory=MixedConfig)  # used by --mode mixed only
