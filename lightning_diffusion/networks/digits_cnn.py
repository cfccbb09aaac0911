"""A small CNN classifier of the 8x8 digits, whose features are the offline digits feature space (`fd_digits-cnn`)."""

from torch import Tensor, nn

IMAGE_SIZE = 8


class DigitsCNN(nn.Module):
    """conv(1->w) -> conv(w->2w, stride 2) -> conv(2w->2w) -> linear (features) -> linear (logits), on 8x8 digits."""

    def __init__(self, width: int = 16, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),  # 8x8 -> 4x4
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * width * (IMAGE_SIZE // 2) ** 2, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, 1, 8, 8) in [-1, 1] -> (features (B, feature_dim), logits (B, num_classes))."""
        features = self.body(x)
        return features, self.head(features)
